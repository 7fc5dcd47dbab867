"""The Ring-linear router (docs/architecture.md#router-and-moe): fp32 logits, sigmoid scores, expert bias for
selection only, group-limited top-k, weights from the unbiased scores normalised and scaled by
`routed_scaling_factor`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.layers.linear import param
from ring_jax.layers.moe.dispatch import expert_counts
from ring_jax.sharding import annotated


class ExpertBias(nnx.Variable):
    """Aux-loss-free load-balancing bias [num_experts] fp32. Not a Param: updated by a sign rule, not gradients."""


class ExpertLoad(nnx.Variable):
    """Tokens routed to each expert [num_experts] fp32 by the last forward (input to the expert-bias update)."""


class RouterOutput(NamedTuple):
    """weights [tokens, top_k] fp32, experts [tokens, top_k] int32, logits [tokens, num_experts] fp32."""

    weights: jax.Array
    experts: jax.Array
    logits: jax.Array


def select_experts(scores: jax.Array, bias: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Group-limited top-k on the biased scores; weights from the unbiased ones.

    scores [tokens, E] (sigmoid of the router logits), bias [E]. Groups are ranked by the sum of their two best
    biased scores; only experts in the `topk_group` best of `n_group` groups compete for the top-k.
    Returns (weights [tokens, k] fp32, experts [tokens, k] int32).
    """
    tokens, num_experts = scores.shape
    biased = scores + bias
    per_group = num_experts // config.n_group
    grouped = biased.reshape(tokens, config.n_group, per_group)
    group_scores = jax.lax.top_k(grouped, min(2, per_group))[0].sum(-1)
    _, kept_groups = jax.lax.top_k(group_scores, config.topk_group)
    kept = jax.nn.one_hot(kept_groups, config.n_group, dtype=jnp.bool_).any(axis=1)
    candidates = jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(tokens, num_experts)
    _, experts = jax.lax.top_k(candidates, config.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if config.norm_topk_prob and config.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, experts.astype(jnp.int32)


class Router(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.kernel = param(rngs, (config.hidden_size, config.num_experts), ("embed", None), config.weight_dtype)
        self.expert_bias = annotated(ExpertBias, jnp.zeros((config.num_experts,), jnp.float32), (None,))
        self.expert_load = annotated(ExpertLoad, jnp.zeros((config.num_experts,), jnp.float32), (None,))

    def __call__(self, x: jax.Array, token_weights: jax.Array | None = None) -> RouterOutput:
        """x [tokens, hidden] -> RouterOutput; records per-expert token counts in `expert_load`, each token
        counted with its weight in `token_weights` [tokens] (0 for padding; default 1)."""
        logits = jnp.dot(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        bias = self.expert_bias[...] if self.config.moe_router_enable_expert_bias else jnp.zeros_like(logits[0])
        weights, experts = select_experts(jax.nn.sigmoid(logits), jax.lax.stop_gradient(bias), self.config)
        self.expert_load.set_value(expert_counts(experts, self.config.num_experts, token_weights))
        return RouterOutput(weights, experts, logits)
