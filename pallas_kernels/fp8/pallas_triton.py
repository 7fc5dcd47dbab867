"""Blockwise FP8 GEMM kernels for NVIDIA GPUs (sm89+: Ada, Hopper), Pallas lowered through Triton.

Why Triton lowering: on JAX 0.11 a `pallas_call` with BlockSpecs lowers through Triton, whose `tt.dot` takes two
FP8 operands of one format with an fp32 accumulator (Hopper: FP8 wgmma), and the same kernels run on CPU in
interpret mode for the tests.

Every kernel runs one inner step per 128-wide contraction block (`_scaled_dot`, summed by `_sum_blocks`): an
FP8 x FP8 dot into a fresh fp32 accumulator, multiplied by the scales of its rows (A) and columns (B) and added to
the fp32 result. The scales change every 128 contraction elements, so they are applied per block, in registers,
not after the loop.

Operands come in two forms (see reference.py for the recipe and the layout):
  pre-quantised  `QTensor` / `GroupedColumns`: FP8 values with the contraction dimension last (the K-major layout
                 Hopper's FP8 wgmma wants for both operands) and fp32 scales [contraction step, line]; activations
                 and gradients quantised by pallas_triton_quantize.py's kernels (grouped drhs: by XLA);
  raw            `RawOperand` (route "pallas_triton_fused"): the bf16 / fp32 tensor; each program quantises the
                 tiles it loads in registers with recipe.quantize_tile (each line's reciprocal scale by an IEEE
                 division, PTX div.rn, so that it rounds as XLA does).
Kernels:
  dense     C [M, N] = A [M, c] . B [N, c]^T: y, dx and dw (dw: A = x^T, B = dy^T, contraction over tokens).
  rows      grouped y and dlhs: the row tiles of GroupTiles (block_m rows cut at group boundaries) each multiply
            rhs[group]; masked stores write every row once; rows past the groups are written as zeros.
  contract  grouped drhs [G, K, N]: a program per (group, K tile, N tile) loops over the group's 128-row tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8 import pallas_triton_quantize
from pallas_kernels.fp8.pallas_triton_quantize import kernel_reciprocal
from pallas_kernels.fp8.recipe import TILE, quantize_tile
from pallas_kernels.fp8.reference import (
    GroupTiles,
    QTensor,
    group_tiles,
    line_scales,
    pad_axis,
    quantize_grouped_columns,
)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of one kernel call (each block a power of two >= 16)."""

    block_m: int = 128  # output rows per program (contract kernel: rows of drhs, i.e. K)
    block_n: int = 128  # output columns per program
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8  # dense: row tiles visited together so that the programs in flight share B tiles in L2
    k_unroll: int = 1  # contraction blocks whose dots are issued before folding (2: fold one while the next runs)
    debug: bool = False  # print each kernel's Triton IR when it is lowered (what the GPU test reads)


DEFAULT_CONFIG = KernelConfig()
# Raw bf16 / fp32 tiles take 2-4x the shared memory of FP8 ones per pipeline stage.
DEFAULT_FUSED_CONFIG = KernelConfig(num_stages=2)
# (kernel, contraction size, output columns) -> config for pre-quantised operands, measured on the GPU by
# benchmarks/fp8.py --sweep.
TUNED_CONFIGS: dict[tuple[str, int, int], KernelConfig] = {}


def kernel_config(kernel: str, contraction: int, columns: int, *operands: Any) -> KernelConfig:
    """The config of a kernel call ("dense", "rows" or "contract") from its shape and operands."""
    if any(isinstance(op, RawOperand) for op in operands):
        return DEFAULT_FUSED_CONFIG
    return TUNED_CONFIGS.get((kernel, contraction, columns), DEFAULT_CONFIG)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["contraction_axis", "dtype", "power_of_two"]
)
@dataclasses.dataclass(frozen=True)
class RawOperand:
    """An operand the kernel quantises itself: data [lines, c] (contraction_axis 1) or [c, lines] (0). A pytree
    whose only leaf is `data`, so that it can be kept from the forward for the backward (a custom-VJP residual)."""

    data: jax.Array
    contraction_axis: int
    dtype: jnp.dtype
    power_of_two: bool


@dataclasses.dataclass(frozen=True)
class _Operand:
    """What a kernel needs to know about an operand at trace time."""

    raw: bool
    contraction_axis: int  # of the 2-D tiles loaded (pre-quantised operands: always 1)
    dtype: str  # FP8 format (of the stored values, or to quantise to)
    power_of_two: bool = False
    block_scaled: bool = False  # one scale per 128 lines and the program's lines lie in one such block


def _prepare(operand: Any, line_block: int) -> tuple[_Operand, tuple[jax.Array, ...], int]:
    """Pads lines to a multiple of `line_block` and the contraction to a multiple of 128 (no copy when aligned).

    Returns the operand's static description, its arrays (values[, scales]) and its number of lines. Scales stay
    per 128-line block when a program's `line_block` lines fit in one block, else they are expanded per line.
    """
    if isinstance(operand, RawOperand):
        lines_axis, c_axis = (-2, -1) if operand.contraction_axis == 1 else (-1, -2)
        data = pad_axis(pad_axis(operand.data, lines_axis, line_block), c_axis, TILE)
        spec = _Operand(True, operand.contraction_axis, jnp.dtype(operand.dtype).name, operand.power_of_two)
        return spec, (data,), operand.data.shape[lines_axis]
    values = pad_axis(pad_axis(operand.values, -2, line_block), -1, TILE)
    lines = operand.values.shape[-2]
    # line_block is a power of two, so a padded weight still has ceil(lines / 128) line blocks.
    block_scaled = getattr(operand, "line_block", 1) == TILE and line_block <= TILE
    if block_scaled:
        scales = operand.scales
    else:
        scales = pad_axis(line_scales(operand) if isinstance(operand, QTensor) else operand.scales, -1, line_block)
    return _Operand(False, 1, values.dtype.name, block_scaled=block_scaled), (values, scales), lines


def _block(size: int, preferred: int) -> int:
    """The preferred block, or the smallest power of two >= 16 covering `size` when that is smaller."""
    return min(preferred, max(16, 1 << (size - 1).bit_length()))


def _split_refs(refs: tuple, *operands: _Operand) -> tuple[list[tuple[Any, Any]], tuple]:
    """(values_ref, scale_ref or None) per operand, then the remaining refs."""
    pairs, rest = [], list(refs)
    for op in operands:
        values = rest.pop(0)
        pairs.append((values, None if op.raw else rest.pop(0)))
    return pairs, tuple(rest)


def _zero_outside(tile: jax.Array, keep: jax.Array) -> jax.Array:
    """FP8 tile with the entries outside `keep` set to +0 (on the bits: no FP8 constants needed)."""
    bits = jax.lax.bitcast_convert_type(tile, jnp.int8)
    return jax.lax.bitcast_convert_type(jnp.where(keep, bits, jnp.int8(0)), tile.dtype)


def _load(op: _Operand, values_ref, scale_ref, lead: tuple, lines, k_start, scale_index, keep, interpret: bool):
    """One contraction step of an operand: (FP8 tile, its fp32 scale per line).

    lead: leading indices (the group of a stacked weight); lines: pl.ds of the operand's lines; k_start: first
    contraction element; scale_index: row of the scale array; keep: [128] bool, contraction elements that take part
    (None: all).
    """
    k = pl.ds(k_start, TILE)
    axis = op.contraction_axis
    tile = values_ref[(*lead, lines, k) if axis == 1 else (*lead, k, lines)]
    if keep is not None:
        keep = keep[None, :] if axis == 1 else keep[:, None]
    if op.raw:
        x = tile.astype(jnp.float32)
        if keep is not None:
            x = jnp.where(keep, x, 0.0)
        return quantize_tile(x, axis, jnp.dtype(op.dtype), op.power_of_two, kernel_reciprocal(interpret))
    if keep is not None:
        tile = _zero_outside(tile, keep)
    if op.block_scaled:  # the program's lines lie in one 128-line block: one scale for the whole tile
        return tile, scale_ref[(*lead, scale_index, lines.start // TILE)]
    return tile, scale_ref[(*lead, scale_index, lines)]


def _scaled_dot(a_op: _Operand, a, a_scale, b_op: _Operand, b, b_scale) -> tuple[jax.Array, jax.Array]:
    """One contraction block: (a . b in fp32, the scale to multiply it by: a_scale[:, None] * b_scale[None, :]).

    A scalar scale (a block-scaled weight tile) leaves one FMA per accumulator element to fold the block in.
    """
    if a.dtype != b.dtype:  # e4m3 x e5m2 gradients: Triton's dot takes one type; bf16 holds both exactly
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    dims = (((a_op.contraction_axis,), (b_op.contraction_axis,)), ((), ()))
    part = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    rows = a_scale[:, None] if a_scale.ndim else a_scale
    columns = b_scale[None, :] if b_scale.ndim else b_scale
    return part, rows * columns


def _fold(acc: jax.Array, part: jax.Array, scale: jax.Array) -> jax.Array:
    return acc + part * scale


def _sum_blocks(start, stop, block: Callable, acc: jax.Array, unroll: int) -> jax.Array:
    """acc + Σ_{i in [start, stop)} part_i * scale_i with (part_i, scale_i) = block(i), in order of i.

    unroll=2 issues the dots of two blocks before folding either, so that the first fold (CUDA cores) can overlap
    the second dot (tensor cores) instead of waiting for it; the sum is the same.
    """
    if unroll == 1:
        return jax.lax.fori_loop(start, stop, lambda i, acc: _fold(acc, *block(i)), acc)

    def pair(j, acc):
        first, second = block(start + 2 * j), block(start + 2 * j + 1)
        return _fold(_fold(acc, *first), *second)

    acc = jax.lax.fori_loop(0, (stop - start) // 2, pair, acc)
    if isinstance(start, int) and isinstance(stop, int):
        return _fold(acc, *block(stop - 1)) if (stop - start) % 2 else acc
    odd = (stop - start) % 2 == 1
    return jax.lax.cond(odd, lambda acc: _fold(acc, *block(stop - 1)), lambda acc: acc, acc)


def _params(cfg: KernelConfig) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# --------------------------------------------------------------------------------------------------------------
# Dense: C [M, N] = A [M, c] . B [N, c]^T.
def _dense_kernel(*refs, a_op: _Operand, b_op: _Operand, unroll: int, interpret: bool):
    ((a_ref, a_scale), (b_ref, b_scale)), (o_ref,) = _split_refs(refs, a_op, b_op)
    bm, bn = o_ref.shape
    steps = a_ref.shape[a_op.contraction_axis] // TILE

    def block(kb):
        k0 = pl.multiple_of(kb * TILE, TILE)
        a, sa = _load(a_op, a_ref, a_scale, (), pl.ds(0, bm), k0, kb, None, interpret)
        b, sb = _load(b_op, b_ref, b_scale, (), pl.ds(0, bn), k0, kb, None, interpret)
        return _scaled_dot(a_op, a, sa, b_op, b, sb)

    o_ref[...] = _sum_blocks(0, steps, block, jnp.zeros((bm, bn), jnp.float32), unroll).astype(o_ref.dtype)


def _swizzled(program: jax.Array, m_tiles: int, n_tiles: int, group: int) -> tuple[jax.Array, jax.Array]:
    """(row tile, column tile) of a program when `group` row tiles are walked column by column together."""
    width = group * n_tiles
    first = (program // width) * group
    size = jnp.minimum(m_tiles - first, group)
    return first + (program % width) % size, (program % width) // size


def _operand_specs(op: _Operand, c: int, block: int, tile_of: Any) -> list[pl.BlockSpec]:
    """BlockSpecs of an operand's arrays: all of the contraction, `block` lines of tile tile_of(program)."""
    if op.contraction_axis == 1:
        specs = [pl.BlockSpec((block, c), lambda p: (tile_of(p), 0))]
    else:
        specs = [pl.BlockSpec((c, block), lambda p: (0, tile_of(p)))]
    if op.block_scaled:  # the one 128-line block holding this tile's lines
        specs.append(pl.BlockSpec((c // TILE, 1), lambda p: (0, tile_of(p) * block // TILE)))
    elif not op.raw:
        specs.append(pl.BlockSpec((c // TILE, block), lambda p: (0, tile_of(p))))
    return specs


def dense_gemm(a: Any, b: Any, out_dtype: jnp.dtype, cfg: KernelConfig | None = None, *, interpret: bool = False):
    """A [M, c] . B [N, c]^T -> [M, N] in out_dtype (A, B: QTensor or RawOperand)."""
    m_lines = a.data.shape[1 - a.contraction_axis] if isinstance(a, RawOperand) else a.values.shape[0]
    n_lines = b.data.shape[1 - b.contraction_axis] if isinstance(b, RawOperand) else b.values.shape[0]
    c_size = a.data.shape[a.contraction_axis] if isinstance(a, RawOperand) else a.values.shape[1]
    cfg = cfg or kernel_config("dense", c_size, n_lines, a, b)
    bm, bn = _block(m_lines, cfg.block_m), _block(n_lines, cfg.block_n)
    a_op, a_arrays, m = _prepare(a, bm)
    b_op, b_arrays, n = _prepare(b, bn)
    c = a_arrays[0].shape[a_op.contraction_axis]
    m_tiles, n_tiles = -(-m // bm), -(-n // bn)
    tiles = functools.partial(_swizzled, m_tiles=m_tiles, n_tiles=n_tiles, group=min(cfg.group_m, m_tiles))
    out = pl.pallas_call(
        functools.partial(_dense_kernel, a_op=a_op, b_op=b_op, unroll=cfg.k_unroll, interpret=interpret),
        grid=(m_tiles * n_tiles,),
        in_specs=[
            *_operand_specs(a_op, c, bm, lambda p: tiles(p)[0]),
            *_operand_specs(b_op, c, bn, lambda p: tiles(p)[1]),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda p: tiles(p)),
        out_shape=jax.ShapeDtypeStruct((m_tiles * bm, n_tiles * bn), out_dtype),
        compiler_params=_params(cfg),
        interpret=interpret,
        debug=cfg.debug,
        name="fp8_blockwise_dense",
    )(*a_arrays, *b_arrays)
    return out[:m, :n]


# --------------------------------------------------------------------------------------------------------------
# Grouped, by rows: out [rows, N], row r of group g = A[r] . B[g]^T.
def _rows_kernel(tile_group_ref, tile_block_ref, bounds_ref, *refs, a_op, b_op, bm, bn, num_groups, unroll,
                 interpret):  # fmt: skip
    ((a_ref, a_scale), (b_ref, b_scale)), (o_ref,) = _split_refs(refs, a_op, b_op)
    tile, col = pl.program_id(0), pl.program_id(1)
    group = tile_group_ref[tile]
    known = jnp.minimum(group, num_groups)  # unused entries (num_groups + 1) write nothing
    row0 = pl.multiple_of(tile_block_ref[tile] * bm, bm)
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    inside = (rows >= bounds_ref[known]) & (rows < bounds_ref[known + 1]) & (group <= num_groups)
    mask = jnp.broadcast_to(inside[:, None], (bm, bn))
    out_tile = o_ref.at[pl.ds(row0, bm), pl.ds(col * bn, bn)]
    steps = a_ref.shape[1] // TILE

    @pl.when(group < num_groups)
    def _():
        def block(kb):
            k0 = pl.multiple_of(kb * TILE, TILE)
            a, sa = _load(a_op, a_ref, a_scale, (), pl.ds(row0, bm), k0, kb, None, interpret)
            b, sb = _load(b_op, b_ref, b_scale, (group,), pl.ds(col * bn, bn), k0, kb, None, interpret)
            return _scaled_dot(a_op, a, sa, b_op, b, sb)

        acc = _sum_blocks(0, steps, block, jnp.zeros((bm, bn), jnp.float32), unroll)
        plgpu.store(out_tile, acc.astype(o_ref.dtype), mask=mask)

    @pl.when(group == num_groups)
    def _():
        plgpu.store(out_tile, jnp.zeros((bm, bn), o_ref.dtype), mask=mask)


def grouped_rows_gemm(
    a: Any, b: QTensor, group_sizes: jax.Array, out_dtype: jnp.dtype, cfg: KernelConfig | None = None, *,
    interpret: bool = False,
) -> jax.Array:  # fmt: skip
    """A [rows, c] (QTensor or RawOperand, rows sorted by group) with B [G, N, c] -> [rows, N]; rows past
    sum(group_sizes) are zero."""
    rows, n_lines = (a.data if isinstance(a, RawOperand) else a.values).shape[0], b.values.shape[1]
    cfg = cfg or kernel_config("rows", b.values.shape[2], n_lines, a)
    bm, bn = _block(rows, cfg.block_m), _block(n_lines, cfg.block_n)
    a_op, a_arrays, _ = _prepare(a, bm)
    b_op, b_arrays, n = _prepare(b, bn)
    padded_rows, num_groups = a_arrays[0].shape[0], b.values.shape[0]
    tiles = group_tiles(group_sizes, padded_rows, bm)
    out = pl.pallas_call(
        functools.partial(
            _rows_kernel,
            a_op=a_op,
            b_op=b_op,
            bm=bm,
            bn=bn,
            num_groups=num_groups,
            unroll=cfg.k_unroll,
            interpret=interpret,
        ),
        grid=(tiles.tile_group.shape[0], -(-n // bn)),
        out_shape=jax.ShapeDtypeStruct((padded_rows, b_arrays[0].shape[1]), out_dtype),
        compiler_params=_params(cfg),
        interpret=interpret,
        debug=cfg.debug,
        name="fp8_blockwise_grouped_rows",
    )(tiles.tile_group, tiles.tile_block, tiles.group_bounds, *a_arrays, *b_arrays)
    return out[:rows, :n]


# --------------------------------------------------------------------------------------------------------------
# Grouped, by contraction over each group's rows: out [G, K, N] = Σ_{rows r of g} A[:, r] B[:, r]^T.
def _contract_kernel(first_tile_ref, tile_block_ref, bounds_ref, *refs, a_op, b_op, bk, bn, unroll, interpret):
    ((a_ref, a_scale), (b_ref, b_scale)), (o_ref,) = _split_refs(refs, a_op, b_op)
    group, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = bounds_ref[group], bounds_ref[group + 1]

    def block(t):
        row0 = pl.multiple_of(tile_block_ref[t] * TILE, TILE)
        rows = row0 + jnp.arange(TILE, dtype=jnp.int32)
        keep = (rows >= lo) & (rows < hi)
        a, sa = _load(a_op, a_ref, a_scale, (), pl.ds(kt * bk, bk), row0, t, keep, interpret)
        # Zeroing one pre-quantised operand outside the group is enough; a raw one needs it for its amax.
        b_keep = keep if b_op.raw else None
        b, sb = _load(b_op, b_ref, b_scale, (), pl.ds(nt * bn, bn), row0, t, b_keep, interpret)
        return _scaled_dot(a_op, a, sa, b_op, b, sb)

    first, stop = first_tile_ref[group], first_tile_ref[group + 1]
    acc = _sum_blocks(first, stop, block, jnp.zeros((bk, bn), jnp.float32), unroll)
    o_ref[0] = acc.astype(o_ref.dtype)


def grouped_contract_gemm(
    a: Any, b: Any, tiles: GroupTiles, num_groups: int, out_dtype: jnp.dtype, cfg: KernelConfig | None = None, *,
    interpret: bool = False,
) -> jax.Array:  # fmt: skip
    """Per group Σ over its rows of A ⊗ B: A holds x [rows, K], B holds dy [rows, N] (GroupedColumns, or
    RawOperand with contraction_axis 0), `tiles` the GroupTiles of 128-row blocks -> [G, K, N]."""
    k_lines = a.data.shape[1] if isinstance(a, RawOperand) else a.values.shape[0]
    n_lines = b.data.shape[1] if isinstance(b, RawOperand) else b.values.shape[0]
    rows = a.data.shape[0] if isinstance(a, RawOperand) else a.values.shape[1]
    cfg = cfg or kernel_config("contract", rows, n_lines, a, b)
    bk, bn = _block(k_lines, cfg.block_m), _block(n_lines, cfg.block_n)
    a_op, a_arrays, k = _prepare(a, bk)
    b_op, b_arrays, n = _prepare(b, bn)
    padded_k = a_arrays[0].shape[1 if a_op.raw else 0]
    padded_n = b_arrays[0].shape[1 if b_op.raw else 0]
    out = pl.pallas_call(
        functools.partial(
            _contract_kernel, a_op=a_op, b_op=b_op, bk=bk, bn=bn, unroll=cfg.k_unroll, interpret=interpret
        ),
        grid=(num_groups, padded_k // bk, padded_n // bn),
        out_specs=pl.BlockSpec((1, bk, bn), lambda g, i, j: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((num_groups, padded_k, padded_n), out_dtype),
        compiler_params=_params(cfg),
        interpret=interpret,
        debug=cfg.debug,
        name="fp8_blockwise_grouped_contract",
    )(tiles.group_first_tile, tiles.tile_block, tiles.group_bounds, *a_arrays, *b_arrays)
    return out[:, :k, :n]


# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TritonBackend:
    """The recipe's GEMMs on the Triton-lowered kernels (see reference.py for the dataflow they plug into).

    fuse_quantization: hand activations and gradients to the kernels raw (quantised in registers) instead of
    quantising them in XLA first. config: one KernelConfig for every call (None: the tuned table / defaults).
    """

    fuse_quantization: bool = False
    interpret: bool = False
    config: KernelConfig | None = None

    def _raw_or(self, quantize, x, contraction_axis, dtype, power_of_two, *args):
        if self.fuse_quantization:
            return RawOperand(x, contraction_axis, jnp.dtype(dtype), power_of_two)
        return quantize(x, *args, dtype, power_of_two)

    def rows(self, x, dtype, power_of_two):
        quantize = functools.partial(pallas_triton_quantize.quantize_rows, interpret=self.interpret)
        return self._raw_or(quantize, x, 1, dtype, power_of_two)

    def columns(self, x, dtype, power_of_two):
        quantize = functools.partial(pallas_triton_quantize.quantize_columns, interpret=self.interpret)
        return self._raw_or(quantize, x, 0, dtype, power_of_two)

    def rows_and_columns(self, x, dtype, power_of_two):
        if self.fuse_quantization:
            return self.rows(x, dtype, power_of_two), self.columns(x, dtype, power_of_two)
        quantize = pallas_triton_quantize.quantize_rows_and_columns
        return quantize(x, dtype, power_of_two, interpret=self.interpret)

    def grouped_columns(self, x, tiles, dtype, power_of_two):
        return self._raw_or(quantize_grouped_columns, x, 0, dtype, power_of_two, tiles)

    def gemm(self, a, b, out_dtype):
        return dense_gemm(a, b, out_dtype, self.config, interpret=self.interpret)

    def grouped_gemm(self, a, b, group_sizes, out_dtype):
        return grouped_rows_gemm(a, b, group_sizes, out_dtype, self.config, interpret=self.interpret)

    def grouped_contract(self, a, b, tiles, group_sizes, out_dtype):
        return grouped_contract_gemm(
            a, b, tiles, group_sizes.shape[0], out_dtype, self.config, interpret=self.interpret
        )
