"""Partial NeoX rotary embedding: rotate-half on the first `rotary_dim` channels of each head
(docs/architecture.md#rotary-embedding-and-qk-norm)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [rotary_dim // 2], attention_scaling) for the config's θ and `rope_scaling` (HF conventions).

    `rope_scaling` is the hook for long context: "linear" divides positions by `factor`; "yarn" blends interpolated
    and extrapolated frequencies by wavelength and scales cos/sin by 0.1·ln(factor) + 1.
    """
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_scaling is None:
        return inv_freq.astype(np.float32), 1.0
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32), 1.0
    # YaRN (arXiv 2309.00071): keep high frequencies, interpolate low ones, linear ramp between.
    original = scaling.get("original_max_position_embeddings", config.max_position_embeddings / factor)
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / max(high - low, 1e-3), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    attention_scaling = scaling.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    return inv_freq.astype(np.float32), float(attention_scaling)


def rope_tables(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """positions [batch, seq] -> (cos, sin) [batch, seq, rotary_dim] fp32 (frequencies duplicated NeoX-style)."""
    inv_freq, attention_scaling = rope_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, seq, heads, head_dim]; rotates x[..., :rotary_dim] in fp32 and passes the rest through."""
    rotary_dim = cos.shape[-1]
    rotated, passthrough = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    first, second = jnp.split(rotated, 2, axis=-1)
    rotate_half = jnp.concatenate([-second, first], axis=-1)
    rotated = rotated * cos[:, :, None, :] + rotate_half * sin[:, :, None, :]
    return jnp.concatenate([rotated.astype(x.dtype), passthrough], axis=-1)
