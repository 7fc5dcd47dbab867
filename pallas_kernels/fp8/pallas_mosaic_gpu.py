"""Blockwise FP8 GEMMs for Hopper (sm90) in Pallas Mosaic GPU: TMA loads, a warp-specialised pipeline, FP8 wgmma.
GPU only; the tests run them in Mosaic GPU interpret mode on CPU.

One kernel serves the dense GEMMs (y, dx, dw) and the grouped ones of the MoE (y, dlhs by rows; drhs by
contraction over each group's rows):

  C [M, N] = Σ_kb (A_kb . B_kb^T) * sa[kb, rows] ⊗ sb[kb, columns]

A [M, c] and B [N, c] are FP8 with the contraction last (wgmma takes 8-bit operands K-major only, so B is handed
over as a transposed view that moves no data); fp32 scales per line and 128-wide contraction block. A weight keeps
one scale per 128 x 128 block: when the output tile's columns lie in one block the kernel reads that single scale
per contraction block (one multiply per row, then one FMA per accumulator element), otherwise a scale per column.

A persistent grid walks the output tiles (128 rows x tile_n columns; dense GEMMs in panels of row tiles, column by
column, for L2 reuse: panel_order). Per tile a memory warpgroup streams
contraction steps of A, B and their scales into shared memory; two compute warpgroups each own 64 of the rows,
issue each 128-wide block's wgmma into a fresh accumulator and fold it into their fp32 register total with the
scales (the recipe's promotion every 128 contraction elements). With two blocks per step the second block's wgmma
runs on the tensor cores while the first is folded in on the CUDA cores. The pipelines of a CTA's consecutive tiles
are chained, so the memory warpgroup streams the next tile's first steps while this one's last are multiplied and
stored.

Grouped by rows: rows sorted by group, B [G, N, c]; the row tiles are reference.GroupTiles (128-row blocks cut at
group boundaries, so a block that two groups share is computed once per group). A tile multiplies its group's
weight and stores only its group's rows (a ladder of TMA stores of 64, 32, ..., 1 rows); rows past the groups get
zeros. Weight gradient: x and dy are quantised into GroupTiles' tiles laid side by side
(reference.quantize_tiles_side_by_side: rows of other groups are zero in each tile), so group g contracts over the
plain column range of its tiles, a pipeline whose length is known only at run time; empty groups get zeros.

`MosaicBackend` (implementation "pallas_mosaic_gpu") runs all of the recipe's GEMMs here; mixed e4m3 x e5m2
products (the e5m2-gradient option) go to the Triton kernels, and their grouped weight gradient to the emulated
recipe.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.mosaic_gpu import PipelinePipeline

from pallas_kernels.fp8.pallas_triton import TritonBackend
from pallas_kernels.fp8.pallas_triton_quantize import quantize_tiles_side_by_side
from pallas_kernels.fp8.recipe import TILE
from pallas_kernels.fp8.reference import (
    GroupTiles,
    QTensor,
    dequantize,
    group_tiles,
    line_scales,
    pad_axis,
    ragged_contract,
)

_ROWS_PER_WARPGROUP = 64  # wgmma's M
_COMPUTE_WARPGROUPS = 2
_TILE_M = _ROWS_PER_WARPGROUP * _COMPUTE_WARPGROUPS


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """tile_n: output columns per tile (the tile is 128 x tile_n); max_concurrent_steps: pipeline depth;
    blocks_per_step: 128-wide contraction blocks per pipeline step (2: fold one block while the next multiplies);
    row_panel: dense GEMMs walk the output tiles in panels of this many row tiles, column by column, so that the
    CTAs running at one time read few distinct row and column operand panels (L2 reuse; 1: row by row)."""

    tile_n: int = 128
    max_concurrent_steps: int = 2
    blocks_per_step: int = 2
    row_panel: int = 8

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MosaicConfig.{name} must be a positive integer, got {value!r}")
        if self.tile_n % 8 or self.tile_n > 256:  # wgmma's N
            raise ValueError(f"MosaicConfig.tile_n must be a multiple of 8 up to 256, got {self.tile_n}")


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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static facts of one call. kind: "dense" (C = A . B^T), "rows" (grouped by rows: GroupTiles cut the rows,
    B [G, N, c]) or "contract" (grouped weight gradient: A, B side by side tiles from
    reference.quantize_tiles_side_by_side, one output [K, N] per group, contracted over the group's tiles).
    block_scaled: sb holds a weight's block scales [G, c/128, N/128] and every output tile lies in one block
    column (else sb is per line)."""

    kind: str
    block_scaled: bool


def _store_rows(out_smem, out_gmem, lo, hi):
    """Copies rows [lo, hi) of out_smem [64, n] to the same rows of out_gmem: TMA transfers have static sizes, so
    the run-time count is stored as its binary digits (64, 32, ..., 1 rows)."""
    size, start, rows = hi - lo, lo, _ROWS_PER_WARPGROUP
    while rows:

        @pl.when(size & rows != 0)
        def _(rows=rows, start=start):
            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(start, rows)], out_gmem.at[pl.ds(start, rows)])

        start = start + (size & rows)
        rows //= 2


def panel_order(index: jax.Array, m_tiles: int, n_tiles: int, row_panel: int) -> tuple:
    """(row tile, column tile) of the index-th output tile of an [m_tiles, n_tiles] grid walked in panels of
    row_panel row tiles (the last panel shorter), each panel column by column. CTAs that run at one time then read
    about row_panel row panels of A and (CTAs / row_panel) column panels of B instead of a few rows and all of B's
    columns, which keeps a long contraction's operands in L2 (dense wgrad at [4096, 12288] x 16384: 1.22x -> 1.29-1.39x
    bf16 on an H200, over runs)."""
    panel, within = lax.div(index, row_panel * n_tiles), lax.rem(index, row_panel * n_tiles)
    panel_rows = jnp.minimum(row_panel, m_tiles - panel * row_panel)
    return panel * row_panel + lax.rem(within, panel_rows), lax.div(within, panel_rows)


def _kernel(*refs, cfg: MosaicConfig, layout: _Layout):
    kind = layout.kind
    if kind == "rows":
        tile_group, tile_block, group_first_tile, group_bounds, a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem = refs
        num_groups, m_tiles = b_gmem.shape[0], tile_group.shape[0]
    elif kind == "contract":
        first_tile, a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem = refs
        num_groups, m_tiles = first_tile.shape[0] - 2, a_gmem.shape[0] // _TILE_M
    else:
        a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem = refs
        num_groups, m_tiles = 1, a_gmem.shape[0] // _TILE_M
    c, tile_n, blocks = a_gmem.shape[1], cfg.tile_n, cfg.blocks_per_step
    n_tiles = b_gmem.shape[1] // tile_n
    step_k = TILE * blocks
    fp8_transforms = _swizzled(a_gmem.dtype, step_k)
    num_items = (num_groups if kind == "contract" else 1) * m_tiles * n_tiles
    # The pipelines of one CTA's consecutive tiles are chained (PipelinePipeline START, STEADY..., STOP): the memory
    # warpgroup loads the next tile's first steps while the compute warpgroups finish this one, instead of draining
    # the pipeline at every tile. That needs a static number of steps that the pipeline depth divides.
    static_steps = c // step_k
    chained = kind != "contract" and static_steps % min(cfg.max_concurrent_steps, static_steps) == 0

    def pipeline(step, context, k_first=0, steps=static_steps, state=None):
        """The contraction steps [k_first, k_first + steps) of one output tile; state: its PipelinePipeline."""
        in_specs = [
            plgpu.BlockSpec((_TILE_M, step_k), lambda k: (0, k_first + k), transforms=fp8_transforms,
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec((tile_n, step_k), lambda k: (0, k_first + k), transforms=fp8_transforms,
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec((blocks, _TILE_M), lambda k: (k_first + k, 0), memory_space=plgpu.SMEM),
        ]  # fmt: skip
        if not layout.block_scaled:
            in_specs.append(plgpu.BlockSpec((blocks, tile_n), lambda k: (k_first + k, 0), memory_space=plgpu.SMEM))
        return plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(steps,),
            memory_registers=40,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=_COMPUTE_WARPGROUPS,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=context,
            pipeline_state=state,
        )

    def operands(rows, columns, b_group) -> list:
        """The pipeline's inputs for one output tile, in in_specs order."""
        refs = [a_gmem.at[rows], b_gmem.at[b_group, columns], sa_gmem.at[:, rows]]
        return refs if layout.block_scaled else [*refs, sb_gmem.at[b_group, :, columns]]

    ignore = lambda *_, **__: None
    # Grouped rows store a run-time range of rows: row offsets of a tiled (swizzled) buffer must be static.
    out_transforms = () if kind == "rows" else _swizzled(out_gmem.dtype, tile_n)
    first_tile_operands = operands(pl.ds(0, _TILE_M), pl.ds(0, tile_n), 0)

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore, ignore).get_allocations(*first_tile_operands),
        out_smem=plgpu.SMEM(
            (_COMPUTE_WARPGROUPS, _ROWS_PER_WARPGROUP, tile_n), out_gmem.dtype, transforms=out_transforms
        ),
        collective_axes="wg",
    )
    def _(allocations, out_smem):
        wg = lax.axis_index("wg")
        my_rows = pl.ds(wg * _ROWS_PER_WARPGROUP, _ROWS_PER_WARPGROUP)
        shape = (_ROWS_PER_WARPGROUP, tile_n)
        zeros = lambda: plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

        @plgpu.nd_loop((num_items,), collective_axes="sm")
        def _(loop):
            (index,) = loop.index
            group, tile = lax.div(index, m_tiles * n_tiles), lax.rem(index, m_tiles * n_tiles)
            row_panel = cfg.row_panel if kind == "dense" else 1  # grouped: the tiles that multiply come first
            tile, column_tile = panel_order(tile, m_tiles, n_tiles, row_panel)
            columns = pl.ds(column_tile * tile_n, tile_n)
            b_group, k_first, steps = group, 0, static_steps
            if kind == "rows":
                group, block = tile_group[tile], tile_block[tile]
                known = jnp.minimum(group, num_groups)  # unused entries (num_groups + 1) store nothing
                first_row = block * _TILE_M + wg * _ROWS_PER_WARPGROUP
                lo = jnp.clip(group_bounds[known] - first_row, 0, _ROWS_PER_WARPGROUP)
                hi = jnp.clip(group_bounds[known + 1] - first_row, 0, _ROWS_PER_WARPGROUP)
                hi = jnp.where(group <= num_groups, hi, lo)
                b_group, multiplies = group, group < num_groups
            elif kind == "contract":
                block, b_group = tile, 0
                k_first, steps = first_tile[group], first_tile[group + 1] - first_tile[group]
                multiplies = steps > 0
            else:
                block = tile
            rows = pl.ds(block * _TILE_M, _TILE_M)
            out_tile = (out_gmem.at[group] if kind == "contract" else out_gmem).at[rows, columns].at[my_rows]

            def store(total):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[wg] = total.astype(out_gmem.dtype)
                plgpu.commit_smem()
                if kind == "rows":
                    _store_rows(out_smem.at[wg], out_tile, lo, hi)
                else:
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], out_tile)

            def block_scales(sa_smem, sb_smem, k, j):
                """Contraction block j's (row scales, column scales); a block-scaled weight's one scale for the
                tile is folded into the row scales (column scales None)."""
                sa = plgpu.load(sa_smem.at[j, my_rows], layout=_vector_layout(0))
                if layout.block_scaled:
                    return sa * sb_gmem[b_group, k * blocks + j, lax.div(column_tile * tile_n, TILE)], None
                return sa, plgpu.load(sb_smem.at[j], layout=_vector_layout(1))

            def fold(total, part, row_scales, column_scales):
                row_scales = lax.broadcast_in_dim(row_scales, shape, [0])
                if column_scales is None:
                    return total + part * row_scales
                return total + part * (row_scales * lax.broadcast_in_dim(column_scales, shape, [1]))

            def step(indices, a_smem, b_smem, sa_smem, *rest):
                *sb_smem, total = rest
                sb_smem = sb_smem[0] if sb_smem else None
                (k,) = indices

                def products(*accs):
                    result = total
                    for j, acc in enumerate(accs):
                        block_k = pl.ds(j * TILE, TILE)
                        plgpu.wgmma(acc, a_smem.at[my_rows, block_k], _transposed(b_smem.at[:, block_k]))
                    for j, acc in enumerate(accs):
                        # A block-scaled weight's scales (two values per thread and one from global memory) are
                        # read while block j's wgmma runs. Per-column scales (32 registers per thread) are read
                        # after it: earlier, they crowd the registers the fold needs (dense wgrad 10-15% slower).
                        early = block_scales(sa_smem, sb_smem, k, j) if layout.block_scaled else None
                        part = plgpu.wgmma_accumulator_load(acc, wait_n=blocks - 1 - j)  # <= blocks-1-j in flight
                        result = fold(result, part, *(early or block_scales(sa_smem, sb_smem, k, j)))
                    return result

                return pl.run_scoped(products, *[plgpu.ACC(shape, jnp.float32) for _ in range(blocks)])

            state = None
            if chained:  # the tiles that multiply come first: a CTA's last such tile has none after it
                multiplying = num_items if kind == "dense" else group_first_tile[num_groups] * n_tiles
                last = index + lax.axis_size("sm") >= multiplying
                # A CTA's only tile is START and skips STOP's drain: nothing uses the buffers after it.
                state = jnp.where(loop.local_index == 0, PipelinePipeline.START,
                                  jnp.where(last, PipelinePipeline.STOP, PipelinePipeline.STEADY))  # fmt: skip

            def multiply():
                pipeline(step, lambda run: store(run(zeros())), k_first, steps, state)(
                    *operands(rows, columns, b_group), allocations=allocations
                )

            if kind == "dense":
                multiply()
                return
            pl.when(multiplies)(multiply)

            # Rows past sum(group_sizes) and empty groups' gradients: zeros, from the compute warpgroups (the
            # memory one holds no output rows).
            empty = (group == num_groups) if kind == "rows" else jnp.logical_not(multiplies)
            pl.when(empty & (wg < _COMPUTE_WARPGROUPS))(lambda: store(zeros()))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _launch(layout: _Layout, cfg: MosaicConfig, interpret: bool, out_shape: tuple, out_dtype, *args) -> jax.Array:
    cores = 2 if interpret else jax.devices()[0].core_count
    return plgpu.kernel(
        functools.partial(_kernel, cfg=cfg, layout=layout),
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(cores,),
        grid_names=("sm",),
        num_threads=_COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )(*args)


def _padded(a: QTensor, b: QTensor, cfg: MosaicConfig, block_scaled: bool) -> tuple[jax.Array, ...]:
    """(A values, B values [G, N, c], A line scales, B scales), padded to whole tiles and contraction steps."""
    step_k = TILE * cfg.blocks_per_step
    a_values = pad_axis(pad_axis(a.values, 0, _TILE_M), 1, step_k)
    a_scales = pad_axis(pad_axis(line_scales(a), 1, _TILE_M), 0, cfg.blocks_per_step)
    b_values = pad_axis(pad_axis(b.values, -2, cfg.tile_n), -1, step_k)
    b_scales = b.scales if block_scaled else pad_axis(line_scales(b), -1, cfg.tile_n)
    return a_values, b_values, a_scales, pad_axis(b_scales, -2, cfg.blocks_per_step)


def _gemm(a: QTensor, b: QTensor, out_dtype, cfg: MosaicConfig, interpret: bool, group_sizes=None) -> jax.Array:
    """A [M, c] . B[g] [N, c]^T -> [M, N]; B's values [G, N, c] (dense: G = 1)."""
    m, n = a.values.shape[0], b.values.shape[-2]
    kind = "dense" if group_sizes is None else "rows"
    layout = _Layout(kind, block_scaled=b.line_block == TILE and TILE % cfg.tile_n == 0)
    a_values, b_values, a_scales, b_scales = _padded(a, b, cfg, layout.block_scaled)
    groups = ()
    if kind == "rows":
        tiles = group_tiles(group_sizes, m, _TILE_M)
        groups = (tiles.tile_group, tiles.tile_block, tiles.group_first_tile, tiles.group_bounds)
    out_shape = (a_values.shape[0], b_values.shape[-2])
    out = _launch(layout, cfg, interpret, out_shape, out_dtype, *groups, a_values, b_values, a_scales, b_scales)
    return out[:m, :n]


def _stacked(b: QTensor) -> QTensor:
    return QTensor(b.values[None], b.scales[None], b.line_block)


def dense_gemm_mosaic(
    a: QTensor, b: QTensor, out_dtype: jnp.dtype, cfg: MosaicConfig | None = None, *, interpret: bool = False
) -> jax.Array:
    """A [M, c] . B [N, c]^T -> [M, N] in out_dtype, both QTensors (pre-quantised, contraction last)."""
    return _gemm(a, _stacked(b), out_dtype, cfg or MosaicConfig(), interpret)


def grouped_rows_gemm_mosaic(
    a: QTensor, b: QTensor, group_sizes: jax.Array, out_dtype: jnp.dtype, cfg: MosaicConfig | None = None, *,
    interpret: bool = False,
) -> jax.Array:  # fmt: skip
    """A [rows, c] sorted by group with B [G, N, c] -> [rows, N]; rows past sum(group_sizes) are zero."""
    return _gemm(a, b, out_dtype, cfg or MosaicConfig(), interpret, group_sizes)


def grouped_contract_gemm_mosaic(
    a: QTensor, b: QTensor, tiles: GroupTiles, out_dtype: jnp.dtype, cfg: MosaicConfig | None = None, *,
    interpret: bool = False,
) -> jax.Array:  # fmt: skip
    """Per group Σ over its tiles of A ⊗ B -> [G, K, N]: A [K, T*128] and B [N, T*128] from
    reference.quantize_tiles_side_by_side (x and dy), `tiles` the GroupTiles of 128-row blocks they were cut by."""
    # A group spans a run-time number of 128-wide tiles: one block per pipeline step.
    cfg = dataclasses.replace(cfg or MosaicConfig(), blocks_per_step=1, max_concurrent_steps=4)
    k, n, num_groups = a.values.shape[0], b.values.shape[0], tiles.group_first_tile.shape[0] - 2
    a_values, b_values, a_scales, b_scales = _padded(a, _stacked(b), cfg, block_scaled=False)
    out_shape = (num_groups, a_values.shape[0], b_values.shape[-2])
    layout = _Layout("contract", block_scaled=False)
    out = _launch(layout, cfg, interpret, out_shape, out_dtype, tiles.group_first_tile, a_values, b_values,
                  a_scales, b_scales)  # fmt: skip
    return out[:, :k, :n]


@dataclasses.dataclass(frozen=True)
class MosaicBackend(TritonBackend):
    """TritonBackend with every GEMM (dense y, dx, dw; grouped y, dlhs, drhs) on this file's kernel, which takes
    pre-quantised operands only (activations and gradients: pallas_triton_quantize.py's kernels). Mixed e4m3 x e5m2
    products go to the Triton kernels (the grouped drhs to the emulated recipe)."""

    mosaic_config: MosaicConfig | None = None

    def __post_init__(self):
        if self.fuse_quantization:
            raise ValueError("MosaicBackend: the Mosaic GPU kernel takes pre-quantised operands only")

    def gemm(self, a, b, out_dtype):
        if a.values.dtype != b.values.dtype:  # e4m3 x e5m2: the Triton kernels' mixed-format path
            return super().gemm(a, b, out_dtype)
        return dense_gemm_mosaic(a, b, out_dtype, self.mosaic_config, interpret=self.interpret)

    def grouped_gemm(self, a, b, group_sizes, out_dtype):
        if a.values.dtype != b.values.dtype:
            return super().grouped_gemm(a, b, group_sizes, out_dtype)
        return grouped_rows_gemm_mosaic(a, b, group_sizes, out_dtype, self.mosaic_config, interpret=self.interpret)

    def grouped_columns(self, x, tiles, dtype, power_of_two):
        return quantize_tiles_side_by_side(x, tiles, dtype, power_of_two, interpret=self.interpret)

    def grouped_contract(self, a, b, tiles, group_sizes, out_dtype):
        if a.values.dtype != b.values.dtype:  # e4m3 x e5m2: the recipe's exact numerics in XLA (slow)
            sizes = jnp.diff(tiles.group_first_tile[:-1]) * TILE
            return ragged_contract(dequantize(a).T, dequantize(b).T, sizes, out_dtype)
        return grouped_contract_gemm_mosaic(a, b, tiles, out_dtype, self.mosaic_config, interpret=self.interpret)
