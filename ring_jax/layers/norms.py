"""RMSNorm (fp32 statistics, as HF) and the grouped RMSNorm of the lightning output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.sharding import LogicalNames, annotated


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x², -1) + eps) in fp32, cast back to x's dtype (before the weight multiply, as HF does)."""
    x32 = x.astype(jnp.float32)
    normalized = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normalized.astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = scale ⊙ rms_normalize(x) over the last axis of size `size`."""

    def __init__(self, size: int, *, eps: float, param_dtype: jnp.dtype, names: LogicalNames = ("norm",)):
        self.scale = annotated(nnx.Param, jnp.ones((size,), param_dtype), names)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_normalize(x, self.eps) * self.scale[...].astype(x.dtype)


class GroupRMSNorm(nnx.Module):
    """RMSNorm over `num_groups` contiguous channel groups; per-channel weight [width]
    (docs/architecture.md#lightning-attention).

    The statistics never cross a group, so a tensor-parallel shard of whole groups normalises locally.
    """

    def __init__(self, width: int, num_groups: int, *, eps: float, param_dtype: jnp.dtype):
        self.scale = annotated(nnx.Param, jnp.ones((width,), param_dtype), ("heads",))
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., width] -> [..., width]."""
        grouped = x.reshape(*x.shape[:-1], self.num_groups, x.shape[-1] // self.num_groups)
        return rms_normalize(grouped, self.eps).reshape(x.shape) * self.scale[...].astype(x.dtype)
