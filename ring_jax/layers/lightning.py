"""Lightning (linear) attention layer: per-head constant decay, grouped RMSNorm, sigmoid output gate
(docs/architecture.md#lightning-attention)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.lightning import lightning_attention, lightning_attention_decode
from ring_jax.config import ModelConfig
from ring_jax.layers.attention import LayerInputs, QKNormRope
from ring_jax.layers.linear import Linear
from ring_jax.layers.norms import GroupRMSNorm
from ring_jax.sharding import constrain, per_shard


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head base decay s_h (docs/architecture.md#decay): geometric with ratio 2^(-8/p) for the power of two
    p <= heads; the remaining heads take every second slope of 2p."""

    def power_of_two_slopes(count: int) -> list[float]:
        ratio = 2.0 ** (-(2.0 ** -(math.log2(count) - 3)))
        return [ratio ** (head + 1) for head in range(count)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(lower)
    if lower < num_heads:
        slopes += power_of_two_slopes(2 * lower)[0::2][: num_heads - lower]
    return np.asarray(slopes, np.float32)


def layer_decay_rates(config: ModelConfig, layer_index: jax.Array | int) -> jax.Array:
    """decay_rate [heads] = s_h · f_l, f_l = 1 − (l − δ)/(L − 1) + 1e−5 (per-step decay exp(−rate))."""
    span = max(config.num_hidden_layers - 1, 1)
    factor = 1.0 - (jnp.asarray(layer_index, jnp.float32) - config.decay_layer_offset) / span + 1e-5
    return jnp.asarray(alibi_slopes(config.num_attention_heads)) * factor


class LightningAttention(nnx.Module):
    """Linear attention with H heads for q, k and v (no GQA)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        width = config.num_attention_heads * config.head_dim
        kwargs = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs, fp8=config.fp8)
        self.qkv = Linear(config.hidden_size, 3 * width, names=("embed", "qkv"), **kwargs)
        self.qk = QKNormRope(config)
        self.gate = Linear(config.hidden_size, width, names=("embed", "heads"), **kwargs)
        self.out_norm = GroupRMSNorm(
            width, config.group_norm_size, eps=config.rms_norm_eps, param_dtype=config.weight_dtype
        )
        self.out = Linear(width, config.hidden_size, names=("heads", "embed"), **kwargs)

    def __call__(
        self,
        x: jax.Array,
        inputs: LayerInputs,
        layer_index: jax.Array | int,
        state: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [batch, seq, hidden]; state [batch, heads, head_dim, head_dim] fp32 or None.

        Returns the output [batch, seq, hidden] and, when a state was given, the state after the last token.
        """
        config = self.config
        batch, seq, _ = x.shape
        heads, head_dim = config.num_attention_heads, config.head_dim
        q, k, v = jnp.split(self.qkv(x).reshape(batch, seq, 3 * heads, head_dim), 3, axis=2)
        q, k = self.qk(q, k, inputs)
        real = inputs.real_tokens(seq)
        if real is not None:  # left padding adds k_tᵀ v_t = 0: the state before a row's first token stays exactly 0
            k = jnp.where(real[:, :, None, None], k, 0)
        names = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
        q, k, v = (constrain(t, names) for t in (q, k, v))
        decay_rates = layer_decay_rates(config, layer_index)
        scale = head_dim**-0.5
        state_names = ("activation_batch", "activation_heads", None, None)
        if seq == 1 and state is not None:  # generation: one recurrent step on the fp32 state
            step_names = ("activation_batch", "activation_heads", "activation_head_dim")
            decode = per_shard(
                lambda q, k, v, rates, state: lightning_attention_decode(
                    q, k, v, rates, state, scale=scale, implementation=config.lightning_decode_implementation
                ),
                in_names=(step_names, step_names, step_names, ("activation_heads",), state_names),
                out_names=(step_names, state_names),
            )
            out, final_state = decode(q[:, 0], k[:, 0], v[:, 0], decay_rates, state)
            out = out[:, None]
        else:
            forward = per_shard(
                lambda q, k, v, rates, state, segments: lightning_attention(
                    q, k, v, rates, scale=scale, initial_state=state, segment_ids=segments,
                    implementation=config.lightning_implementation,
                ),
                in_names=(names, names, names, ("activation_heads",), state_names,
                          ("activation_batch", "activation_length")),
                out_names=(names, state_names),
            )  # fmt: skip
            out, final_state = forward(q, k, v, decay_rates, state, inputs.segment_ids)
        gated = self.out_norm(out.reshape(batch, seq, heads * head_dim)) * jax.nn.sigmoid(self.gate(x))
        return self.out(gated), (final_state if state is not None else None)
