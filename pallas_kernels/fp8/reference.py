"""The blockwise FP8 training recipe in plain JAX: quantisers, the recipe's dataflow (forward and backward GEMMs
with a custom VJP) and the emulated GEMMs ("reference": quantise -> dequantise -> fp32 GEMM, any platform).

The recipe. Every GEMM operand is quantised along the GEMM's contraction dimension, in tiles of 128, with an fp32
scale per tile: scale = amax(|tile|) / format max (448 for e4m3fn; computed as amax x fp32(1/448), at least the
smallest normal fp32, optionally rounded up to a power of two), values = round-to-nearest-even(clip(x x
fp32(1 / scale))): a product with the tile's reciprocal (recipe.reciprocal and recipe.to_fp8 say why not a division).
Weights use 128 x 128 blocks instead, one scale per block, so the same quantised weight serves both GEMMs it
takes part in. Partial edge tiles (a dimension that is not a multiple of 128) are scaled by their own amax.

  y  = x @ w      x [M, K]: 1 x 128 tiles along K (one scale per row and 128 columns), forward format;
                  w [K, N]: 128 x 128 blocks, forward format.
  dx = dy @ w^T   dy [M, N]: 1 x 128 tiles along N, gradient format; w: the same blocks as the forward.
  dw = x^T @ dy   x and dy: 128 x 1 tiles along M (one scale per column and 128 rows), forward / gradient
                  format. Rows are cut into the aligned blocks [128 i, 128 (i + 1)).
When differentiated, the forward quantises x both ways (rows for y, columns for dw) and keeps the FP8 columns for the
backward instead of x; the backward quantises dy both ways (a kernel backend reads x or dy once for both).

Grouped (MoE) matmul, lhs [rows, K] sorted by group, rhs [G, K, N]: lhs and the output gradient are quantised per
row as above (a row tile never spans groups); each group's weight [K, N] in 128 x 128 blocks; for drhs
(per group lhs^T @ dy) the 128-row column tiles are the aligned blocks further cut at group boundaries, so no tile
mixes two groups. Rows past sum(group_sizes) give zero outputs and gradients and take part in no tile.

Every product is accumulated in fp32 (kernels: per 128-wide contraction block, then multiplied by both scales);
results come back in the input's dtype (dw in the weight's dtype).

Operands travel in one layout, contraction dimension last: `QTensor(values [lines, c], scales [ceil(c/128), lines])`
means values[l, j] * scales[j // 128, l]; a weight keeps one scale per 128 lines (`line_block`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fp8.recipe import TILE, Fp8Recipe, quantize_tile, reciprocal, scale_from_amax, to_fp8


def num_tiles(size: int) -> int:
    return -(-size // TILE)


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads `axis` up to a multiple of `multiple` (no copy when it already is one)."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["line_block"])
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantised GEMM operand, contraction last: values [..., lines, c] fp8, scales [..., ceil(c/128),
    ceil(lines/line_block)] fp32; values[l, j] stands for values[l, j] * scales[j // 128, l // line_block].

    line_block is 1 for activations and gradients (a scale per line) and 128 for weights (a scale per 128 x 128
    block), which lets a kernel whose tile lies in one block apply a single scale to it.
    """

    values: jax.Array
    scales: jax.Array
    line_block: int = 1


class BlockQuantized(NamedTuple):
    """A weight [..., K, N] in 128 x 128 blocks: values [..., K, N] fp8, scales [..., ceil(K/128), ceil(N/128)]."""

    values: jax.Array
    scales: jax.Array

    def input_side(self) -> QTensor:
        """The weight as the second operand of y = x @ w (contraction K): lines N."""
        return QTensor(jnp.swapaxes(self.values, -1, -2), self.scales, TILE)

    def output_side(self) -> QTensor:
        """The weight as the second operand of dx = dy @ w^T (contraction N): lines K."""
        return QTensor(self.values, jnp.swapaxes(self.scales, -1, -2), TILE)


def quantize_rows(x: jax.Array, dtype: jnp.dtype, power_of_two: bool) -> QTensor:
    """x [..., rows, c] -> QTensor: one scale per row and 128-wide block of the last dimension."""
    c = x.shape[-1]
    tiles = pad_axis(x, -1, TILE).reshape(*x.shape[:-1], num_tiles(c), TILE)
    values, scales = quantize_tile(tiles, -1, dtype, power_of_two)
    return QTensor(values.reshape(*x.shape[:-1], -1)[..., :c], jnp.swapaxes(scales, -1, -2))


def quantize_columns(x: jax.Array, dtype: jnp.dtype, power_of_two: bool) -> QTensor:
    """x [m, c] -> QTensor [c, m] of x^T: one scale per column and aligned 128-row block (dw's operands)."""
    return quantize_rows(x.T, dtype, power_of_two)


def quantize_blocks(w: jax.Array, dtype: jnp.dtype, power_of_two: bool) -> BlockQuantized:
    """w [..., K, N] -> BlockQuantized: one scale per 128 x 128 block (partial edge blocks by their own amax)."""
    k, n = w.shape[-2:]
    lead = w.shape[:-2]
    padded = pad_axis(pad_axis(w, -2, TILE), -1, TILE)
    blocks = padded.reshape(*lead, num_tiles(k), TILE, num_tiles(n), TILE)
    scales = scale_from_amax(jnp.max(jnp.abs(blocks.astype(jnp.float32)), axis=(-3, -1)), dtype, power_of_two)
    values = to_fp8(blocks, reciprocal(scales)[..., :, None, :, None], dtype)
    return BlockQuantized(values.reshape(padded.shape)[..., :k, :n], scales)


def line_scales(q: QTensor) -> jax.Array:
    """q's scales with one entry per line: [..., ceil(c/128), lines]."""
    return jnp.repeat(q.scales, q.line_block, axis=-1)[..., : q.values.shape[-2]]


def from_fp8(values: jax.Array) -> jax.Array:
    """FP8 values -> fp32, kept a real round trip. XLA may delete an f32 -> fp8 -> f32 conversion pair, and the
    quantisation with it, when excess precision is allowed (its default): on the H200 the emulated grouped weight
    gradient came out unquantised, 3% away from the recipe. The optimization barrier keeps the fp8 array."""
    return jax.lax.optimization_barrier(values).astype(jnp.float32)


def dequantize(q: QTensor) -> jax.Array:
    """QTensor -> fp32 [..., lines, c]."""
    c = q.values.shape[-1]
    scales = jnp.repeat(jnp.swapaxes(line_scales(q), -1, -2), TILE, axis=-1)[..., :c]
    return from_fp8(q.values) * scales


# --------------------------------------------------------------------------------------------------------------
# Groups: rows sorted by group, cut into tiles that never span two groups.
class GroupTiles(NamedTuple):
    """Row blocks of `block` rows cut at group boundaries, in row order (static length T = blocks + groups).

    tile_group [T] int32: the tile's group; num_groups is the pseudo group of the rows past sum(group_sizes),
      num_groups + 1 marks unused entries at the end.
    tile_block [T] int32: the tile's row block (rows [block * b, block * (b + 1)) intersected with its group).
    group_first_tile [num_groups + 2] int32: the tiles of group g are [first[g], first[g + 1]) (pseudo group too).
    group_bounds [num_groups + 2] int32: group g owns rows [bounds[g], bounds[g + 1]) (pseudo group too).
    """

    tile_group: jax.Array
    tile_block: jax.Array
    group_first_tile: jax.Array
    group_bounds: jax.Array


def group_tiles(group_sizes: jax.Array, num_rows: int, block: int) -> GroupTiles:
    """GroupTiles of rows sorted by group with `group_sizes` [G] (sizes past num_rows are cut at num_rows)."""
    num_groups = group_sizes.shape[0]
    num_blocks = -(-num_rows // block)
    total = jnp.sum(group_sizes.astype(jnp.int32))
    sizes = jnp.concatenate([group_sizes.astype(jnp.int32), jnp.maximum(num_rows - total, 0)[None]])
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first_block = starts // block
    counts = jnp.where(ends > starts, (ends - 1) // block - first_block + 1, 0)
    first_tile = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)]).astype(jnp.int32)
    tile = jnp.arange(num_blocks + num_groups, dtype=jnp.int32)
    tile_group = jnp.searchsorted(first_tile[1:], tile, side="right").astype(jnp.int32)
    known = jnp.minimum(tile_group, num_groups)
    tile_block = jnp.where(tile_group <= num_groups, first_block[known] + tile - first_tile[known], 0)
    bounds = jnp.concatenate([starts, ends[-1:]]).astype(jnp.int32)
    return GroupTiles(tile_group, tile_block.astype(jnp.int32), first_tile, bounds)


def row_tiles(tiles: GroupTiles, num_rows: int, block: int) -> tuple[jax.Array, jax.Array]:
    """(tile index [num_rows] int32, in a real group [num_rows] bool) of each row."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    group = jnp.searchsorted(tiles.group_bounds[1:], rows, side="right").astype(jnp.int32)
    first_block = tiles.group_bounds[group] // block
    tile = tiles.group_first_tile[group] + rows // block - first_block
    return tile, group < tiles.group_first_tile.shape[0] - 2


class GroupedColumns(NamedTuple):
    """x [rows, c] quantised for drhs: values [c, rows] fp8 (x^T, contraction last), scales [T, c] fp32: row r of
    x in tile t (GroupTiles with 128-row blocks) stands for values[:, r] * scales[t]."""

    values: jax.Array
    scales: jax.Array


def tile_row_ranges(tiles: GroupTiles) -> tuple[jax.Array, jax.Array]:
    """(lo [T], hi [T]) int32: tile t holds the rows of its block in [lo[t], hi[t]), its group's rows (unused
    entries: the pseudo group's)."""
    group = jnp.minimum(tiles.tile_group, tiles.group_bounds.shape[0] - 2)
    return tiles.group_bounds[group], tiles.group_bounds[group + 1]


def _tile_blocks(x: jax.Array, tiles: GroupTiles) -> jax.Array:
    """x [rows, c] -> [T, 128, c] fp32: each tile's 128-row block with the rows outside the tile's group zeroed.
    A gather of whole blocks: reads stay plain (no scatter-max)."""
    c = x.shape[1]
    blocks = pad_axis(x, 0, TILE).reshape(-1, TILE, c)[tiles.tile_block].astype(jnp.float32)
    block_rows = tiles.tile_block[:, None] * TILE + jnp.arange(TILE, dtype=jnp.int32)[None, :]
    lo, hi = tile_row_ranges(tiles)
    inside = (block_rows >= lo[:, None]) & (block_rows < hi[:, None])
    return jnp.where(inside[..., None], blocks, 0.0)


def quantize_grouped_columns(x: jax.Array, tiles: GroupTiles, dtype: jnp.dtype, power_of_two: bool) -> GroupedColumns:
    """x [rows, c] -> GroupedColumns: one scale per column and tile (aligned 128-row block within one group)."""
    tile_of_row, _ = row_tiles(tiles, x.shape[0], TILE)
    amax = jnp.max(jnp.abs(_tile_blocks(x, tiles)), axis=1)
    scales = scale_from_amax(amax, dtype, power_of_two)  # [T, c]
    return GroupedColumns(to_fp8(x, reciprocal(scales)[tile_of_row], dtype).T, scales)


def quantize_tiles_side_by_side(x: jax.Array, tiles: GroupTiles, dtype: jnp.dtype, power_of_two: bool) -> QTensor:
    """x [rows, c] -> QTensor of [c, T * 128]: the same quantisation as quantize_grouped_columns, laid out so that
    tile t owns contraction columns [128 t, 128 (t + 1)) (its block's rows, those of other groups zero) and a
    group's tiles are contiguous; scales [T, c]. A kernel then contracts group g over the plain column range of
    tiles [first[g], first[g + 1]), with no masking."""
    values, scales = quantize_tile(_tile_blocks(x, tiles), 1, dtype, power_of_two)  # [T, 128, c], [T, c]
    return QTensor(jnp.transpose(values, (2, 0, 1)).reshape(x.shape[1], -1), scales)


def dequantize_grouped_columns(q: GroupedColumns, tiles: GroupTiles) -> jax.Array:
    """GroupedColumns -> fp32 [rows, c]; rows past sum(group_sizes) are zero."""
    tile_of_row, in_group = row_tiles(tiles, q.values.shape[1], TILE)
    x = from_fp8(q.values).T * q.scales[tile_of_row]
    return jnp.where(in_group[:, None], x, 0.0)


# --------------------------------------------------------------------------------------------------------------
# The recipe's dataflow, shared by every backend. A backend supplies how operands are prepared (quantised here in
# JAX, or handed to a kernel that quantises them itself) and the GEMMs that consume them.
@dataclasses.dataclass(frozen=True)
class Emulated:
    """The reference backend: quantises in JAX and multiplies the dequantised operands in fp32."""

    def rows(self, x: jax.Array, dtype: jnp.dtype, power_of_two: bool) -> QTensor:
        return quantize_rows(x, dtype, power_of_two)

    def columns(self, x: jax.Array, dtype: jnp.dtype, power_of_two: bool) -> QTensor:
        return quantize_columns(x, dtype, power_of_two)

    def rows_and_columns(self, x: jax.Array, dtype: jnp.dtype, power_of_two: bool) -> tuple[QTensor, QTensor]:
        """(rows(x), columns(x)): the operands of a dense GEMM's two uses of x (a kernel backend reads x once)."""
        return self.rows(x, dtype, power_of_two), self.columns(x, dtype, power_of_two)

    def grouped_columns(self, x: jax.Array, tiles: GroupTiles, dtype: jnp.dtype, power_of_two: bool) -> Any:
        return quantize_grouped_columns(x, tiles, dtype, power_of_two)

    def gemm(self, a: QTensor, b: QTensor, out_dtype: jnp.dtype) -> jax.Array:
        """a [M, c], b [N, c] -> [M, N]."""
        product = jnp.dot(dequantize(a), dequantize(b).T, precision=jax.lax.Precision.HIGHEST)
        return product.astype(out_dtype)

    def grouped_gemm(self, a: QTensor, b: QTensor, group_sizes: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
        """a [rows, c] sorted by group, b [G, N, c] -> [rows, N]; rows past sum(group_sizes) are zero."""
        product = jax.lax.ragged_dot(
            dequantize(a), jnp.swapaxes(dequantize(b), 1, 2), group_sizes, precision=jax.lax.Precision.HIGHEST
        )
        return product.astype(out_dtype)

    def grouped_contract(
        self, a: GroupedColumns, b: GroupedColumns, tiles: GroupTiles, group_sizes: jax.Array, out_dtype: jnp.dtype
    ) -> jax.Array:
        """Per group a_g^T @ b_g over the group's rows: a, b hold x [rows, K], dy [rows, N] -> [G, K, N]."""
        x, dy = dequantize_grouped_columns(a, tiles), dequantize_grouped_columns(b, tiles)
        return ragged_contract(x, dy, group_sizes, out_dtype)


def ragged_contract(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
    """x [rows, K], dy [rows, N] fp32, rows sorted by group -> [G, K, N]: per group x_g^T @ dy_g in fp32."""
    shape = (group_sizes.shape[0], x.shape[1], dy.shape[1])
    ragged = lambda rhs: jax.lax.ragged_dot(x, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST)
    _, pullback = jax.vjp(ragged, jnp.zeros(shape, jnp.float32))
    return pullback(dy)[0].astype(out_dtype)


class OpConfig(NamedTuple):
    """Static arguments of the ops: the backend, the recipe and the weight's dtype (its gradient's dtype)."""

    backend: Any
    recipe: Fp8Recipe
    weight_dtype: jnp.dtype


def _weight_blocks(w, recipe: Fp8Recipe) -> BlockQuantized:
    return quantize_blocks(w, recipe.forward_dtype, recipe.power_of_two_scales)


def _forward_operands(x, w, cfg: OpConfig):
    recipe = cfg.recipe
    return cfg.backend.rows(x, recipe.forward_dtype, recipe.power_of_two_scales), _weight_blocks(w, recipe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x: jax.Array, w: jax.Array, cfg: OpConfig) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype, by the recipe with `cfg.backend`'s GEMMs."""
    a, weight = _forward_operands(x, w, cfg)
    return cfg.backend.gemm(a, weight.input_side(), x.dtype)


def _matmul_fwd(x, w, cfg):
    """The forward when differentiated: x is quantised for this GEMM (rows) and for dw (columns) in one pass, and
    the FP8 columns are kept for the backward instead of x."""
    recipe = cfg.recipe
    a, x_columns = cfg.backend.rows_and_columns(x, recipe.forward_dtype, recipe.power_of_two_scales)
    weight = _weight_blocks(w, recipe)
    return cfg.backend.gemm(a, weight.input_side(), x.dtype), (x_columns, weight)


def _matmul_bwd(cfg, residuals, dy):
    x_columns, weight = residuals
    backend, recipe = cfg.backend, cfg.recipe
    dy_rows, dy_columns = backend.rows_and_columns(dy, recipe.gradient_dtype, recipe.power_of_two_scales)
    dx = backend.gemm(dy_rows, weight.output_side(), dy.dtype)  # dy has y's dtype, which is x's
    dw = backend.gemm(x_columns, dy_columns, cfg.weight_dtype)
    return dx, dw


fp8_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, cfg: OpConfig) -> jax.Array:
    """lhs [rows, K] sorted by group, rhs [G, K, N], group_sizes [G] int32 -> [rows, N] in lhs's dtype."""
    return _grouped_fwd(lhs, rhs, group_sizes, cfg)[0]


def _grouped_fwd(lhs, rhs, group_sizes, cfg):
    a, weight = _forward_operands(lhs, rhs, cfg)
    out = cfg.backend.grouped_gemm(a, weight.input_side(), group_sizes, lhs.dtype)
    return out, (lhs, weight, group_sizes)


def _grouped_bwd(cfg, residuals, dy):
    lhs, weight, group_sizes = residuals
    backend, recipe = cfg.backend, cfg.recipe
    fwd, grad, pow2 = recipe.forward_dtype, recipe.gradient_dtype, recipe.power_of_two_scales
    dlhs = backend.grouped_gemm(backend.rows(dy, grad, pow2), weight.output_side(), group_sizes, lhs.dtype)
    tiles = group_tiles(group_sizes, lhs.shape[0], TILE)
    a = backend.grouped_columns(lhs, tiles, fwd, pow2)
    b = backend.grouped_columns(dy, tiles, grad, pow2)
    drhs = backend.grouped_contract(a, b, tiles, group_sizes, cfg.weight_dtype)
    return dlhs, drhs, None


fp8_grouped_matmul.defvjp(_grouped_fwd, _grouped_bwd)
