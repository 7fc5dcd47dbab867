"""The MoE feed-forward block: router + routed experts (stacked [E, ...] weights) + shared expert."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.layers.linear import param
from ring_jax.layers.mlp import SwiGLU
from ring_jax.layers.moe.parallel import routed_experts
from ring_jax.layers.moe.router import Router
from ring_jax.sharding import constrain


class RouterStats(NamedTuple):
    """expert_load [num_experts] fp32 tokens per expert; z_loss scalar fp32 = mean(logsumexp(logits)²)."""

    expert_load: jax.Array
    z_loss: jax.Array


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stored stacked: gate, up [E, hidden, inter], down [E, inter, hidden]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        shape_in = (config.num_experts, config.hidden_size, config.moe_intermediate_size)
        shape_out = (config.num_experts, config.moe_intermediate_size, config.hidden_size)
        dtype = config.weight_dtype
        self.gate = param(rngs, shape_in, ("expert", "embed", "expert_mlp"), dtype)
        self.up = param(rngs, shape_in, ("expert", "embed", "expert_mlp"), dtype)
        self.down = param(rngs, shape_out, ("expert", "expert_mlp", "embed"), dtype)


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.router = Router(config, rngs=rngs)
        self.experts = RoutedExperts(config, rngs=rngs)
        self.shared = (
            SwiGLU(
                config.hidden_size,
                config.moe_shared_expert_intermediate_size * config.num_shared_experts,
                dtype=config.compute_dtype,
                param_dtype=config.weight_dtype,
                rngs=rngs,
                fp8=config.fp8,
            )
            if config.num_shared_experts
            else None
        )

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
        """x [batch, seq, hidden], token_mask [batch, seq] bool (False: padding) -> ([batch, seq, hidden], stats).

        Every token is routed (dropless); only unmasked tokens count in the expert load and the z-loss.
        """
        tokens = constrain(x.reshape(-1, x.shape[-1]), ("activation_tokens", "activation_embed"))
        valid = None if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
        routing = self.router(tokens, valid)
        routed = routed_experts(
            tokens,
            routing.experts,
            routing.weights,
            self.experts.gate[...],
            self.experts.up[...],
            self.experts.down[...],
            self.config,
        )
        if self.shared is not None:
            routed = routed + self.shared(tokens)
        z_per_token = jax.nn.logsumexp(routing.logits, axis=-1) ** 2
        z_loss = jnp.mean(z_per_token) if valid is None else jnp.sum(z_per_token * valid) / jnp.maximum(valid.sum(), 1)
        return routed.reshape(x.shape), RouterStats(self.router.expert_load[...], z_loss)
