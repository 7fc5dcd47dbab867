"""The recipe's activation and gradient quantisers as Pallas kernels lowered through Triton (GPU): one read of the
bf16 / fp32 operand, FP8 values and fp32 scales written once, in the layouts the GEMM kernels read.

Why kernels: XLA forms the transposed operands of the weight gradients (x^T and dy^T quantised per 128 rows) as a
gather or a transpose of FP8 data plus a separate amax reduction, several passes over memory; in a Ring-mini
training step on an H200 those passes took about 84 ms against 58 ms for the FP8 GEMMs themselves. Here each
program loads one tile, reduces it in registers, transposes it there (the column quantisers) and stores FP8; the
same step went from 302 to 217 ms (BENCHMARKS.md).

Quantisers (the same numbers as reference.py, which the tests compare them with bit for bit):
  rows          x [M, c] -> QTensor [M, c]: one scale per row and 128 columns (A of y = x w and dx = dy w^T).
  rows and columns  x [M, c] -> (rows, the aligned column tiles below) from one read of x: each program quantises
                one 128 x 128 tile both ways (x in the forward, which keeps the columns for dw; dy in the backward).
  column tiles  x [rows, c], and per tile t a row block b[t] with a row range [lo[t], hi[t]) -> QTensor
                [c, T * 128] of x^T: tile t owns contraction columns [128 t, 128 (t + 1)), x's rows
                128 b[t] + i for i < 128 with those outside [lo[t], hi[t]) zeroed; scales [T, c], one per
                column and tile. The dense weight gradient takes the aligned blocks (quantize_columns), the
                grouped one GroupTiles's blocks cut at group boundaries (quantize_tiles_side_by_side).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8.recipe import TILE, quantize_tile, reciprocal
from pallas_kernels.fp8.reference import GroupTiles, QTensor, num_tiles, pad_axis, tile_row_ranges

# Lines per program: 64 rows x 128 columns (rows) or 64 columns x 128 rows (column tiles), a 16 KiB bf16 load, 4
# warps (BENCHMARKS.md: a sweep of 32-256 lines and 2-8 warps found this the fastest or within 4% in 11 of 12
# cases). Both ways at once take whole 128 x 128 tiles, also with 4 warps (8 and 16 were 5-69% slower on an H200).
BLOCK_LINES = 64
_NUM_WARPS = 4


def kernel_reciprocal(interpret: bool) -> Callable[[jax.Array], jax.Array]:
    """recipe.reciprocal for kernel code: IEEE 1 / scale through PTX div.rn (Triton lowers `/` to div.full, 2 ulp
    off); in interpret mode the XLA one."""
    if interpret:
        return reciprocal

    def div_rn(scale):
        (quotient,) = plgpu.elementwise_inline_asm(
            "div.rn.f32 $0, $1, $2;",
            args=[jnp.ones_like(scale), scale],
            constraints="=f,f,f",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(scale.shape, jnp.float32)],
        )
        return quotient

    return div_rn


def _rows_kernel(x_ref, values_ref, scales_ref, *, dtype, power_of_two, interpret):
    values, scales = quantize_tile(x_ref[...], 1, dtype, power_of_two, kernel_reciprocal(interpret))
    values_ref[...] = values
    scales_ref[...] = scales[None, :]


def quantize_rows(x: jax.Array, dtype: jnp.dtype, power_of_two: bool, *, interpret: bool = False) -> QTensor:
    """x [M, c] -> QTensor [M, c] (scales [ceil(c/128), M]), as reference.quantize_rows."""
    m, c = x.shape
    padded = pad_axis(pad_axis(x, 0, BLOCK_LINES), 1, TILE)
    grid = (padded.shape[0] // BLOCK_LINES, padded.shape[1] // TILE)
    values, scales = pl.pallas_call(
        functools.partial(_rows_kernel, dtype=jnp.dtype(dtype), power_of_two=power_of_two, interpret=interpret),
        grid=grid,
        in_specs=[pl.BlockSpec((BLOCK_LINES, TILE), lambda i, j: (i, j))],
        out_specs=[
            pl.BlockSpec((BLOCK_LINES, TILE), lambda i, j: (i, j)),
            pl.BlockSpec((1, BLOCK_LINES), lambda i, j: (j, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(padded.shape, dtype),
            jax.ShapeDtypeStruct((grid[1], padded.shape[0]), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="fp8_quantize_rows",
    )(padded)
    return QTensor(values[:m, :c], scales[:, :m])


def _rows_and_columns_kernel(x_ref, rows_ref, row_scales_ref, columns_ref, column_scales_ref, *, dtype,
                             power_of_two, interpret):  # fmt: skip
    tile, inverse = x_ref[...], kernel_reciprocal(interpret)
    values, scales = quantize_tile(tile, 1, dtype, power_of_two, inverse)
    rows_ref[...] = values
    row_scales_ref[...] = scales[None, :]
    # Transposed in the input's dtype, as the column tiles below.
    values, scales = quantize_tile(tile.T, 1, dtype, power_of_two, inverse)
    columns_ref[...] = values
    column_scales_ref[...] = scales[None, :]


def quantize_rows_and_columns(
    x: jax.Array, dtype: jnp.dtype, power_of_two: bool, *, interpret: bool = False
) -> tuple[QTensor, QTensor]:
    """x [M, c] -> (quantize_rows(x), quantize_columns(x)) from one read of x: QTensor [M, c] (scales
    [ceil(c/128), M]) and QTensor [c, M] of x^T (scales [ceil(M/128), c])."""
    m, c = x.shape
    padded = pad_axis(pad_axis(x, 0, TILE), 1, TILE)
    grid = (padded.shape[0] // TILE, padded.shape[1] // TILE)
    tile = lambda transposed: pl.BlockSpec((TILE, TILE), lambda i, j: (j, i) if transposed else (i, j))
    scales = lambda transposed: pl.BlockSpec((1, TILE), lambda i, j: (i, j) if transposed else (j, i))
    rows, row_scales, columns, column_scales = pl.pallas_call(
        functools.partial(
            _rows_and_columns_kernel, dtype=jnp.dtype(dtype), power_of_two=power_of_two, interpret=interpret
        ),
        grid=grid,
        in_specs=[tile(False)],
        out_specs=[tile(False), scales(False), tile(True), scales(True)],
        out_shape=[
            jax.ShapeDtypeStruct(padded.shape, dtype),
            jax.ShapeDtypeStruct((grid[1], padded.shape[0]), jnp.float32),
            jax.ShapeDtypeStruct(padded.shape[::-1], dtype),
            jax.ShapeDtypeStruct((grid[0], padded.shape[1]), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="fp8_quantize_rows_and_columns",
    )(padded)
    return QTensor(rows[:m, :c], row_scales[:, :m]), QTensor(columns[:c, :m], column_scales[:, :c])


def _column_tiles_kernel(block_ref, lo_ref, hi_ref, x_ref, values_ref, scales_ref, *, dtype, power_of_two,
                         interpret):  # fmt: skip
    t, j = pl.program_id(0), pl.program_id(1)
    row0 = pl.multiple_of(block_ref[t] * TILE, TILE)
    rows = row0 + jnp.arange(TILE, dtype=jnp.int32)
    keep = (rows >= lo_ref[t]) & (rows < hi_ref[t])
    # Transposed in the input's dtype (half the shared memory of fp32), then reduced along its 128 rows.
    tile = x_ref[pl.ds(row0, TILE), pl.ds(pl.multiple_of(j * BLOCK_LINES, BLOCK_LINES), BLOCK_LINES)].T
    tile = jnp.where(keep[None, :], tile.astype(jnp.float32), 0.0)
    values, scales = quantize_tile(tile, 1, dtype, power_of_two, kernel_reciprocal(interpret))
    values_ref[...] = values
    scales_ref[...] = scales[None, :]


def _column_tiles(x, block, lo, hi, dtype, power_of_two, interpret) -> QTensor:
    """The column-tile quantiser: QTensor [ceil(c/64) * 64, T * 128] (see the module docstring)."""
    padded = pad_axis(pad_axis(x, 0, TILE), 1, BLOCK_LINES)
    count, lines = block.shape[0], padded.shape[1]
    values, scales = pl.pallas_call(
        functools.partial(
            _column_tiles_kernel, dtype=jnp.dtype(dtype), power_of_two=power_of_two, interpret=interpret
        ),
        grid=(count, lines // BLOCK_LINES),
        out_specs=[
            pl.BlockSpec((BLOCK_LINES, TILE), lambda t, j: (j, t)),
            pl.BlockSpec((1, BLOCK_LINES), lambda t, j: (t, j)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((lines, count * TILE), dtype),
            jax.ShapeDtypeStruct((count, lines), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="fp8_quantize_column_tiles",
    )(block, lo, hi, padded)
    return QTensor(values, scales)


def quantize_columns(x: jax.Array, dtype: jnp.dtype, power_of_two: bool, *, interpret: bool = False) -> QTensor:
    """x [m, c] -> QTensor [c, m] of x^T, as reference.quantize_columns (the aligned 128-row blocks)."""
    m, c = x.shape
    count = num_tiles(m)
    block = jnp.arange(count, dtype=jnp.int32)
    lo, hi = jnp.zeros((count,), jnp.int32), jnp.full((count,), m, jnp.int32)
    q = _column_tiles(x, block, lo, hi, dtype, power_of_two, interpret)
    return QTensor(q.values[:c, :m], q.scales[:, :c])


def quantize_tiles_side_by_side(
    x: jax.Array, tiles: GroupTiles, dtype: jnp.dtype, power_of_two: bool, *, interpret: bool = False
) -> QTensor:
    """x [rows, c] -> QTensor [c, T * 128], as reference.quantize_tiles_side_by_side."""
    lo, hi = tile_row_ranges(tiles)
    q = _column_tiles(x, tiles.tile_block, lo, hi, dtype, power_of_two, interpret)
    c = x.shape[1]
    return QTensor(q.values[:c], q.scales[:, :c])
