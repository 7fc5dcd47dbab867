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
    when asked), at least the smallest normal fp32 so that an all-zero tile has a finite inverse.

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


def reciprocal(scale: jax.Array) -> jax.Array:
    """fp32 1 / scale (IEEE division), behind an optimization barrier so that XLA keeps the product with it.

    XLA's algebraic simplifier rewrites a division by a broadcast into a product with the reciprocal (XLA:CPU, in
    some compiled programs and not others); the two round differently at FP8 rounding ties, which made the CPU
    tests' bit-exact comparisons flaky. Defining the recipe by the product and hiding the reciprocal from the
    simplifier makes every CPU path agree bit for bit. On the H200, XLA still computed x / scale in one case (one FP8
    value in about a million one step off, at a tie); the Triton kernels compute the product exactly.
    """
    return jax.lax.optimization_barrier(jnp.ones_like(scale) / scale)


def to_fp8(x: jax.Array, inverse: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x x inverse (the tile's reciprocal scale) rounded to nearest even in `dtype`; clipped first because
    out-of-range casts give NaN. A product rather than x / scale: one division per tile instead of one per element,
    and what every path (XLA, Triton, NumPy) computes identically."""
    limit = format_max(dtype)
    return jnp.clip(x.astype(jnp.float32) * inverse, -limit, limit).astype(dtype)


def quantize_tile(
    x: jax.Array, axis: int, dtype: jnp.dtype, power_of_two: bool, inverse: Callable = reciprocal
) -> tuple[jax.Array, jax.Array]:
    """One scale per line of `x` along `axis` (a tile's lines): (values in `dtype`, scales fp32 with `axis`
    reduced away). `inverse` maps scales to their reciprocals (kernels pass their own IEEE division)."""
    scale = scale_from_amax(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis), dtype, power_of_two)
    return to_fp8(x, jnp.expand_dims(inverse(scale), axis), dtype), scale
