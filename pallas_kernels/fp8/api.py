"""Blockwise FP8 matmuls (1 x 128 activation / gradient tiles, 128 x 128 weight blocks, fp32 scales and
accumulation; the recipe is spelled out in reference.py), dense and grouped, with their FP8 backward.

Implementations:
  "reference"            quantise -> dequantise -> fp32 GEMM in plain JAX: the recipe's exact numerics anywhere.
  "pallas_triton"        Pallas kernels lowered through Triton (GPU, sm89+): FP8 x FP8 dots with fp32 accumulation,
                         rescaled per 128-wide contraction block in the kernel; activations and gradients are
                         quantised before the kernel by one-pass Triton kernels (pallas_triton_quantize.py).
  "pallas_triton_fused"  the same kernels quantising the bf16 / fp32 activation and gradient tiles in registers
                         (no FP8 copy in memory; the quantisation is redone by every program that reads a tile).
  "pallas_mosaic_gpu"    Pallas Mosaic GPU kernels (Hopper: TMA, warp-specialised pipeline, FP8 wgmma) for the dense
                         GEMMs, the grouped ones by rows and the grouped weight gradient (operands laid out tile by
                         tile, pallas_mosaic_gpu.py); the same quantisation kernels; 1.2-3.6x bf16 per GEMM on an
                         H200.
  "*_interpret"          a kernel route in Pallas interpret mode (any backend; slow, for tests).
None picks per platform (`pallas_kernels.dispatch`): on GPU "pallas_mosaic_gpu" (Hopper) then "pallas_triton"
(sm89+; measured slower: a Ring-mini training step at 0.61x bf16's speed before the quantisation kernels, against
Mosaic's 1.26-1.27x with them), "reference" elsewhere (CPU, TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import Implementation, Op, on_platform
from pallas_kernels.fp8.recipe import Fp8Recipe
from pallas_kernels.fp8.reference import OpConfig, fp8_grouped_matmul, fp8_matmul

_GPU = on_platform("gpu")


def _hopper() -> str | None:
    """Availability of the Mosaic GPU kernels: wgmma and TMA need compute capability 9.0 (Hopper)."""
    if reason := _GPU():
        return reason
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return None if float(capability) >= 9.0 else f"needs a Hopper GPU (compute capability 9.0; this one {capability})"


BLOCKWISE_FP8 = Op(
    "blockwise_fp8",
    "pallas_kernels.fp8",
    {
        "reference": Implementation("reference:Emulated"),
        "pallas_triton": Implementation("pallas_triton:TritonBackend", available=_GPU),
        "pallas_triton_fused": Implementation("pallas_triton:TritonBackend", {"fuse_quantization": True},
                                              available=_GPU),
        "pallas_triton_interpret": Implementation("pallas_triton:TritonBackend", {"interpret": True}),
        "pallas_triton_fused_interpret": Implementation("pallas_triton:TritonBackend",
                                                        {"fuse_quantization": True, "interpret": True}),
        "pallas_mosaic_gpu": Implementation("pallas_mosaic_gpu:MosaicBackend", available=_hopper),
        "pallas_mosaic_gpu_interpret": Implementation("pallas_mosaic_gpu:MosaicBackend", {"interpret": True}),
    },
    {"gpu": ("pallas_mosaic_gpu", "pallas_triton"), "tpu": ("reference",), "cpu": ("reference",)},
)  # fmt: skip
# The compiled kernel routes (what model.fp8 may name besides "emulated" / "native").
NATIVE_IMPLEMENTATIONS = tuple(n for n in BLOCKWISE_FP8.names() if n != "reference" and not n.endswith("_interpret"))


def backend(implementation: str | None):
    """The backend object (its GEMMs) of an implementation name (None: the platform's order)."""
    return BLOCKWISE_FP8.resolve(implementation)()


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
        raise ValueError(f"{name}: expected a 16- or 32-bit float array, got {x.dtype}")


def blockwise_matmul(
    x: jax.Array, w: jax.Array, *, implementation: str | None = None, recipe: Fp8Recipe | None = None
) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype, both operands and the backward's gradients in FP8.

    x is quantised per 1 x 128 tile of each row, w per 128 x 128 block (K and N of any size: partial edge tiles are
    scaled by their own amax); default recipe: scale = amax / 448 in fp32, round-to-nearest-even to
    float8_e4m3fn, fp32 accumulation. Differentiable in x and w (dw in w's dtype).
    """
    _check_float("x", x)
    _check_float("w", w)
    if w.ndim != 2:
        raise ValueError(f"w: expected [K, N], got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x: last dimension of shape {x.shape} must equal w's K = {w.shape[0]}")
    cfg = OpConfig(backend(implementation), recipe or Fp8Recipe(), jnp.dtype(w.dtype))
    out = fp8_matmul(x.reshape(-1, x.shape[-1]), w, cfg)
    return out.reshape(*x.shape[:-1], w.shape[1])


def blockwise_grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    recipe: Fp8Recipe | None = None,
) -> jax.Array:
    """lhs [rows, K] sorted by group, rhs [G, K, N], group_sizes [G] int -> [rows, N] in lhs's dtype.

    Row r of group g (rows sum(group_sizes[:g]) ...) is multiplied by rhs[g]; rows past sum(group_sizes) give
    zeros. lhs in 1 x 128 tiles per row, each group's weight in 128 x 128 blocks; the backward quantises the
    output gradient the same way and, for rhs's gradient, lhs and the gradient in 128-row column tiles that never
    span two groups. Differentiable in lhs and rhs.
    """
    _check_float("lhs", lhs)
    _check_float("rhs", rhs)
    if lhs.ndim != 2:
        raise ValueError(f"lhs: expected [rows, K], got shape {lhs.shape}")
    if rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"rhs: expected [groups, K={lhs.shape[1]}, N], got shape {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes: expected int [{rhs.shape[0]}], got {group_sizes.dtype} {group_sizes.shape}")
    cfg = OpConfig(backend(implementation), recipe or Fp8Recipe(), jnp.dtype(rhs.dtype))
    return fp8_grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), cfg)
