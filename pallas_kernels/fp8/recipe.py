"""The blockwise FP8 recipe's numbers: tile width, formats, and how one tile's scale and FP8 values are formed.

These element-wise formulas are shared by the array-level quantisers (reference.py) and the kernels, which apply
them to tiles in registers, so that every path rounds the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TILE = 128  # width of a quantisation tile along the contraction dimension (and of a weight block's sides)
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_SMALLEST_SCALE = float(np.finfo(np.float32).tiny)  # an all-zero tile gets this scale (its values stay 0)
_MANTISSA_MASK = (1 << 23) - 1


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    """How operands are quantised (hashable: a static argument of the ops).

    Attributes:
      forward_format: FP8 format of activations and weights ("float8_e4m3fn": max 448).
      gradient_format: FP8 format of the output gradient in the backward GEMMs ("float8_e4m3fn" as the paper,
        or "float8_e5m2": max 57344, more range, one mantissa bit less).
      power_of_two_scales: round each scale up to a power of two (quantising then only shifts exponents).
    """

    forward_format: str = "float8_e4m3fn"
    gradient_format: str = "float8_e4m3fn"
    power_of_two_scales: bool = False

    def __post_init__(self):
        for field in ("forward_format", "gradient_format"):
            if getattr(self, field) not in FP8_FORMATS:
                raise ValueError(f"Fp8Recipe.{field}: must be one of {FP8_FORMATS}, got {getattr(self, field)!r}")

    @property
    def forward_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.forward_format)

    @property
    def gradient_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.gradient_format)


def format_max(dtype: jnp.dtype) -> float:
    """Largest finite value of an FP8 format (448 for e4m3fn, 57344 for e5m2)."""
    return float(jnp.finfo(dtype).max)


def scale_from_amax(amax: jax.Array, dtype: jnp.dtype, power_of_two: bool) -> jax.Array:
    """fp32 scale of a tile whose largest magnitude is `amax`: amax / format max (rounded up to a power of two
    when asked), at least the smallest normal fp32 so that an all-zero tile divides cleanly.

    The division is a product with the fp32 reciprocal of the format max: XLA rewrites a division by a constant
    that way anyway, and a product rounds identically in XLA, Triton and NumPy.
    """
    reciprocal = np.float32(1.0 / format_max(dtype))
    scale = jnp.maximum(amax.astype(jnp.float32) * reciprocal, _SMALLEST_SCALE)
    if power_of_two:
        # Exact on the bits: a non-zero mantissa carries into the exponent, then the mantissa is cleared.
        bits = jax.lax.bitcast_convert_type(scale, jnp.int32)
        bits = (bits + _MANTISSA_MASK) & ~_MANTISSA_MASK
        scale = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return scale


def to_fp8(x: jax.Array, scale: jax.Array, dtype: jnp.dtype, divide: Callable = jnp.divide) -> jax.Array:
    """x / scale (IEEE division; kernels pass their own) rounded to nearest even in `dtype`; clipped first because
    out-of-range casts give NaN."""
    limit = format_max(dtype)
    return jnp.clip(divide(x.astype(jnp.float32), scale), -limit, limit).astype(dtype)


def quantize_tile(
    x: jax.Array, axis: int, dtype: jnp.dtype, power_of_two: bool, divide: Callable = jnp.divide
) -> tuple[jax.Array, jax.Array]:
    """One scale per line of `x` along `axis` (a tile's lines): (values in `dtype`, scales fp32 with `axis`
    reduced away)."""
    scale = scale_from_amax(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis), dtype, power_of_two)
    return to_fp8(x, jnp.broadcast_to(jnp.expand_dims(scale, axis), x.shape), dtype, divide), scale
