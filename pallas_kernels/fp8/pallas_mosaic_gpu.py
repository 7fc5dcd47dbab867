"""Blockwise FP8 dense GEMM for Hopper (sm90) in Pallas Mosaic GPU: TMA loads, a warp-specialised pipeline, FP8
wgmma. GPU only; the tests run it in Mosaic GPU interpret mode on CPU.

C [M, N] = Σ_kb (A_kb . B_kb^T) * sa[kb, rows] ⊗ sb[kb, columns], with A [M, c] and B [N, c] FP8 with the
contraction last (wgmma takes 8-bit operands K-major only, so B is handed over as a transposed view that moves no
data) and fp32 scales per line and 128-wide contraction block (a weight's block scales are repeated per line). A
memory warpgroup streams contraction blocks of A, B and their scales into shared memory; two compute warpgroups
each own 64 rows of the 128 x tile_n output tile, issue a block's wgmma into a fresh accumulator and fold it into
their fp32 register total with the scales (the recipe's promotion every 128 contraction elements).

`MosaicBackend` (implementation "pallas_mosaic_gpu") runs the recipe's dense GEMMs here and the grouped ones on the
Triton kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8.pallas_triton import TritonBackend
from pallas_kernels.fp8.recipe import TILE
from pallas_kernels.fp8.reference import QTensor, line_scales, pad_axis

_ROWS_PER_WARPGROUP = 64  # wgmma's M
_COMPUTE_WARPGROUPS = 2


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """tile_n: output columns per CTA (the output tile is 128 x tile_n); max_concurrent_steps: pipeline depth."""

    tile_n: int = 128
    max_concurrent_steps: int = 4


# The Mosaic GPU API moves between JAX releases; these spell each construct the way the running version knows it.
def _transposed(ref):
    """A 2-D SMEM ref seen transposed (a Ref method on JAX 0.12, plgpu.transpose_ref before)."""
    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def _vector_layout(axis: int):
    """Register layout of a vector broadcast along `axis` of a WGMMA tile (0: one value per row, 1: per column)."""
    name = ("WGMMA_ROW", "WGMMA_COL")[axis]
    return getattr(plgpu.Layout, name) if hasattr(plgpu.Layout, name) else plgpu.Layout.WGMMA.reduce(1 - axis)


def _swizzled(dtype: jnp.dtype, minor: int) -> tuple:
    """Tiling + swizzle transforms of an SMEM tile whose minor dimension holds `minor` elements of `dtype`."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem, *, cfg: MosaicConfig):
    m, c = a_gmem.shape
    n, tile_n = b_gmem.shape[0], cfg.tile_n
    tile_m = _ROWS_PER_WARPGROUP * _COMPUTE_WARPGROUPS
    m_tiles, n_tiles = m // tile_m, n // tile_n
    fp8_transforms = _swizzled(a_gmem.dtype, TILE)

    def pipeline(step, context):
        return plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(c // TILE,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tile_m, TILE), lambda k: (0, k), transforms=fp8_transforms, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tile_n, TILE), lambda k: (0, k), transforms=fp8_transforms, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((1, tile_m), lambda k: (k, 0), memory_space=plgpu.SMEM),
                plgpu.BlockSpec((1, tile_n), lambda k: (k, 0), memory_space=plgpu.SMEM),
            ],  # fmt: skip
            wg_axis="wg",
            num_compute_wgs=_COMPUTE_WARPGROUPS,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=context,
        )

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, sa_gmem, sb_gmem),
        out_smem=plgpu.SMEM(
            (_COMPUTE_WARPGROUPS, _ROWS_PER_WARPGROUP, tile_n),
            out_gmem.dtype,
            transforms=_swizzled(out_gmem.dtype, tile_n),
        ),  # fmt: skip
        collective_axes="wg",
    )
    def _(allocations, out_smem):
        wg = lax.axis_index("wg")
        my_rows = pl.ds(wg * _ROWS_PER_WARPGROUP, _ROWS_PER_WARPGROUP)
        shape = (_ROWS_PER_WARPGROUP, tile_n)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _(loop):
            (index,) = loop.index
            rows = pl.ds(lax.div(index, n_tiles) * tile_m, tile_m)
            columns = pl.ds(lax.rem(index, n_tiles) * tile_n, tile_n)

            def context(run):
                total = run(plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[wg] = total.astype(out_gmem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows, columns].at[my_rows])

            def step(_, a_smem, b_smem, sa_smem, sb_smem, total):
                def block_product(acc_ref):
                    plgpu.wgmma(acc_ref, a_smem.at[my_rows], _transposed(b_smem))
                    return acc_ref[...]

                part = pl.run_scoped(block_product, plgpu.ACC(shape, jnp.float32))
                sa = plgpu.load(sa_smem.at[0, my_rows], layout=_vector_layout(0))
                sb = plgpu.load(sb_smem.at[0], layout=_vector_layout(1))
                scale = lax.broadcast_in_dim(sa, shape, [0]) * lax.broadcast_in_dim(sb, shape, [1])
                return total + part * scale

            pipeline(step, context)(
                a_gmem.at[rows], b_gmem.at[columns], sa_gmem.at[:, rows], sb_gmem.at[:, columns],
                allocations=allocations,
            )  # fmt: skip

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def dense_gemm_mosaic(
    a: QTensor, b: QTensor, out_dtype: jnp.dtype, cfg: MosaicConfig | None = None, *, interpret: bool = False
) -> jax.Array:
    """A [M, c] . B [N, c]^T -> [M, N] in out_dtype, both QTensors (pre-quantised, contraction last)."""
    cfg = cfg or MosaicConfig()
    tile_m = _ROWS_PER_WARPGROUP * _COMPUTE_WARPGROUPS
    m, n = a.values.shape[0], b.values.shape[0]
    a_values = pad_axis(pad_axis(a.values, 0, tile_m), 1, TILE)
    b_values = pad_axis(pad_axis(b.values, 0, cfg.tile_n), 1, TILE)
    a_scales = pad_axis(line_scales(a), 1, tile_m)
    b_scales = pad_axis(line_scales(b), 1, cfg.tile_n)
    cores = 2 if interpret else jax.devices()[0].core_count
    out = plgpu.kernel(
        functools.partial(_kernel, cfg=cfg),
        out_type=jax.ShapeDtypeStruct((a_values.shape[0], b_values.shape[0]), out_dtype),
        grid=(cores,),
        grid_names=("sm",),
        num_threads=_COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )(a_values, b_values, a_scales, b_scales)
    return out[:m, :n]


@dataclasses.dataclass(frozen=True)
class MosaicBackend(TritonBackend):
    """TritonBackend with the dense GEMMs (y, dx, dw) on this file's kernel; activations and gradients are
    quantised by XLA (the kernel takes pre-quantised operands only), the grouped GEMMs stay on Triton."""

    mosaic_config: MosaicConfig | None = None

    def __post_init__(self):
        if self.fuse_quantization:
            raise ValueError("MosaicBackend: the Mosaic GPU kernel takes pre-quantised operands only")

    def gemm(self, a, b, out_dtype):
        return dense_gemm_mosaic(a, b, out_dtype, self.mosaic_config, interpret=self.interpret)
