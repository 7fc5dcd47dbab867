"""Lightning attention Pallas kernels for TPU (Mosaic), forward and backward.

Grid (batch, heads, chunks) with the chunk axis sequential ("arbitrary"): each step loads one chunk of q, k, v
into VMEM, and the fp32 state [head_dim, head_dim] lives in a VMEM scratch across steps; the batch and head axes
are parallel (megacore). Inputs are laid out [batch, heads, seq, head_dim] so each block is a (chunk, head_dim)
tile; the chunk is 128 so matmuls fill the MXU and document-id rows meet the (8, 128) tiling. The backward runs a
dq kernel forward in time (rebuilding the state) and a dk/dv kernel backward in time (chunks visited in reverse by
the index maps) that carries dL/dstate in VMEM and ends with the initial state's gradient. Off TPU it runs under
`interpret=pltpu.InterpretParams()` (tests). Same math as the GPU kernels (`chunk_math`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning import chunk_math
from pallas_kernels.lightning.common import (
    default_scale,
    document_index,
    kernel_vjp,
    pad_to_multiple,
    validate_inputs,
)


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    seq: int  # real sequence length (inputs padded to a multiple of `chunk`)
    scale: float
    has_segments: bool
    chunk: int = 128
    interpret: bool = False


def _weights(cfg: TpuConfig, rate_ref, doc_col_ref, doc_row_ref, chunk_index, prev_doc):
    n = jnp.minimum(cfg.seq - chunk_index * cfg.chunk, cfg.chunk)
    rate = rate_ref[pl.program_id(1)]
    tables = chunk_math.decay_tables(rate, cfg.chunk, cfg.scale)
    return chunk_math.chunk_weights(tables, rate, n, doc_col_ref[...], doc_row_ref[...], prev_doc, cfg.has_segments)


def _forward_kernel(
    rate_ref,
    doc_col_ref,
    doc_row_ref,
    q_ref,
    k_ref,
    v_ref,
    s0_ref,
    o_ref,
    sf_ref,
    state_ref,
    prev_doc_ref,
    *,
    cfg: TpuConfig,
):
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        state_ref[...] = s0_ref[...]
        prev_doc_ref[0] = 0

    wts = _weights(cfg, rate_ref, doc_col_ref, doc_row_ref, i, prev_doc_ref[0])
    out, state = chunk_math.forward(q_ref[...], k_ref[...], v_ref[...], state_ref[...], wts)
    o_ref[...] = out.astype(o_ref.dtype)
    state_ref[...] = state
    prev_doc_ref[0] = wts.last_doc

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        sf_ref[...] = state


def _dq_kernel(
    rate_ref, doc_col_ref, doc_row_ref, do_ref, k_ref, v_ref, s0_ref, dq_ref, state_ref, prev_doc_ref, *, cfg: TpuConfig
):
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        state_ref[...] = s0_ref[...]
        prev_doc_ref[0] = 0

    wts = _weights(cfg, rate_ref, doc_col_ref, doc_row_ref, i, prev_doc_ref[0])
    dq, state = chunk_math.backward_dq(do_ref[...], k_ref[...], v_ref[...], state_ref[...], wts)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    state_ref[...] = state
    prev_doc_ref[0] = wts.last_doc


def _dkdv_kernel(
    rate_ref,
    doc_col_ref,
    doc_row_ref,
    doc_before_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    dsf_ref,
    dk_ref,
    dv_ref,
    ds0_ref,
    dstate_ref,
    *,
    cfg: TpuConfig,
):
    step, num_chunks = pl.program_id(2), pl.num_programs(2)
    i = num_chunks - 1 - step

    @pl.when(step == 0)
    def _():
        dstate_ref[...] = dsf_ref[...]

    prev_doc = jnp.where(i > 0, jnp.max(doc_before_ref[...]), 0) if cfg.has_segments else jnp.int32(0)
    wts = _weights(cfg, rate_ref, doc_col_ref, doc_row_ref, i, prev_doc)
    q, k, v, do, dstate = q_ref[...], k_ref[...], v_ref[...], do_ref[...], dstate_ref[...]
    dk, new_dstate = chunk_math.backward_dk(q, v, do, dstate, wts)
    dv, _ = chunk_math.backward_dv(q, k, do, dstate, wts)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dstate_ref[...] = new_dstate

    @pl.when(step == num_chunks - 1)
    def _():
        ds0_ref[...] = new_dstate


def _specs(cfg: TpuConfig, head_dim: int, reverse: bool = False):
    """BlockSpecs for grid (batch, heads, chunks); `reverse` visits chunks last to first."""
    chunk_of = (lambda i: pl.num_programs(2) - 1 - i) if reverse else (lambda i: i)
    tile = pl.BlockSpec((None, None, cfg.chunk, head_dim), lambda b, h, i: (b, h, chunk_of(i), 0))
    state = pl.BlockSpec((None, None, head_dim, head_dim), lambda b, h, i: (b, h, 0, 0))
    doc_col = pl.BlockSpec((None, cfg.chunk, 1), lambda b, h, i: (b, chunk_of(i), 0))
    doc_row = pl.BlockSpec((None, 1, cfg.chunk), lambda b, h, i: (b, 0, chunk_of(i)))
    doc_before = pl.BlockSpec((None, cfg.chunk, 1), lambda b, h, i: (b, jnp.maximum(chunk_of(i) - 1, 0), 0))
    rate = pl.BlockSpec(memory_space=pltpu.SMEM)
    return tile, state, doc_col, doc_row, doc_before, rate


def _call(kernel, cfg: TpuConfig, grid, in_specs, out_specs, out_shape, scratch, name):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        name=name,
    )


def _forward_call(q, k, v, rate, doc, s0, cfg: TpuConfig):
    """q, k, v [batch, heads, seq, head_dim] (seq a multiple of the chunk); doc [batch, seq]."""
    batch, heads, seq_len, head_dim = q.shape
    tile, state, doc_col, doc_row, _, rate_spec = _specs(cfg, head_dim)
    state_shape = jax.ShapeDtypeStruct(s0.shape, jnp.float32)
    return _call(
        _forward_kernel,
        cfg,
        (batch, heads, seq_len // cfg.chunk),
        [rate_spec, doc_col, doc_row, tile, tile, tile, state],
        [tile, state],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), state_shape],
        [pltpu.VMEM((head_dim, head_dim), jnp.float32), pltpu.SMEM((1,), jnp.int32)],
        "lightning_forward_tpu",
    )(rate, doc[:, :, None], doc[:, None, :], q, k, v, s0)


def _backward_call(q, k, v, rate, doc, s0, do, dsf, cfg: TpuConfig):
    batch, heads, seq_len, head_dim = q.shape
    grid = (batch, heads, seq_len // cfg.chunk)
    tile, state, doc_col, doc_row, _, rate_spec = _specs(cfg, head_dim)
    dq = _call(
        _dq_kernel,
        cfg,
        grid,
        [rate_spec, doc_col, doc_row, tile, tile, tile, state],
        tile,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        [pltpu.VMEM((head_dim, head_dim), jnp.float32), pltpu.SMEM((1,), jnp.int32)],
        "lightning_backward_dq_tpu",
    )(rate, doc[:, :, None], doc[:, None, :], do, k, v, s0)
    tile, state, doc_col, doc_row, doc_before, rate_spec = _specs(cfg, head_dim, reverse=True)
    dk, dv, ds0 = _call(
        _dkdv_kernel,
        cfg,
        grid,
        [rate_spec, doc_col, doc_row, doc_before, tile, tile, tile, tile, state],
        [tile, tile, state],
        [
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(s0.shape, jnp.float32),
        ],
        [pltpu.VMEM((head_dim, head_dim), jnp.float32)],
        "lightning_backward_dkdv_tpu",
    )(rate, doc[:, :, None], doc[:, None, :], doc[:, :, None], q, k, v, do, dsf)
    return dq, dk, dv, ds0


_lightning = kernel_vjp(_forward_call, _backward_call)


def lightning_attention_mosaic_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    chunk: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `lightning_attention_reference`; decay_rate gets no gradient."""
    validate_inputs(q, k, v, decay_rate, initial_state, segment_ids)
    batch, seq, heads, head_dim = q.shape
    cfg = TpuConfig(
        seq=seq,
        scale=default_scale(head_dim, scale),
        has_segments=segment_ids is not None,
        chunk=chunk,
        interpret=interpret,
    )
    doc = pad_to_multiple(document_index(segment_ids, batch, seq), 1, chunk, edge=True)
    qt, kt, vt = (jnp.swapaxes(pad_to_multiple(x, 1, chunk), 1, 2) for x in (q, k, v))
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32)
    out, final_state = _lightning(
        qt, kt, vt, decay_rate.astype(jnp.float32), doc, initial_state.astype(jnp.float32), cfg
    )
    return jnp.swapaxes(out, 1, 2)[:, :seq], final_state
