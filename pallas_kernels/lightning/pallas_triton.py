"""Lightning attention Pallas kernels for NVIDIA GPUs, lowered through Triton.

Why Triton lowering: a plain `pallas_call` with BlockSpecs lowers through Triton on NVIDIA GPUs with JAX 0.11 and
0.12 alike, and runs on CPU with `interpret=True` for CI. Mosaic GPU could go further (TMA, wgmma) but needs its own
idioms (`plgpu.kernel`, `emit_pipeline`, explicit swizzles) that JAX 0.11 and 0.12 still move around; the op is
memory-bound (about 50-100 FLOP per byte moved), so what decides speed here is bytes and parallelism, which Triton
lowering controls.

Kernels (one program per (batch, head[, value block]), the fp32 state carried in registers over a loop of chunks):
- forward: single pass; reads q, k, v once and writes o and the final state (no per-chunk state in HBM, unlike
  fla's two-pass `chunk_fwd_h` + `chunk_fwd_o`). Optionally (`splits`) the sequence is cut into pieces run as
  extra batch rows, for shapes where batch * heads leaves SMs idle (see `_forward_call`).
- backward: a dq kernel forward in time (rebuilding the state rows of its key block), then a dk kernel (key
  blocks) and a dv kernel (value blocks) backward in time, each carrying its rows / columns of dL/dstate exactly;
  the dk kernel's final dL/dstate is the initial state's gradient. Wired with `jax.custom_vjp`.
- decode: one token, state [batch, heads, head_dim, head_dim] fp32 updated in place (input/output aliased, donated).
`decay_rate` is treated as a constant (the model's decay is a fixed buffer): it gets no gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.lightning import chunk_math
from pallas_kernels.lightning.common import (
    default_scale,
    document_index,
    kernel_vjp,
    pad_to_multiple,
    validate_decode_inputs,
    validate_inputs,
)

_RATE_WIDTH = 16  # decay rate broadcast to [heads, 16] so each program loads a power-of-two vector


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings (hashable: used as a custom_vjp non-differentiable argument)."""

    seq: int  # real sequence length (inputs are padded to a multiple of `chunk`)
    scale: float
    has_segments: bool
    chunk: int = 64
    block_v: int = 32  # value columns per forward program
    block_k: int = 32  # key (dq, dk) or value (dv) columns per backward program
    num_warps: int = 4
    num_stages: int = 3
    bwd_num_warps: int = 4
    # Forward sequence pieces run in parallel; 0 picks from the shape (`_auto_splits`). Default 1: the split path
    # is tested (interpret mode) but not yet timed on the H100, see benchmarks/results/lightning.md.
    splits: int = 1
    target_programs: int = 256
    interpret: bool = False


def _params(cfg: KernelConfig, num_warps: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages)


def _rate(rate_ref):
    return jnp.max(rate_ref[...])


def _chunk_weights(cfg: KernelConfig, rate, doc_ref, t0, prev_doc, offset=0):
    """offset: position of the program's first token in the whole (unsplit) sequence."""
    doc = doc_ref[pl.ds(t0, cfg.chunk)] if cfg.has_segments else None
    doc_col, doc_row = (doc[:, None], doc[None, :]) if cfg.has_segments else (None, None)
    n = jnp.clip(cfg.seq - offset - t0, 0, cfg.chunk)
    return chunk_math.chunk_weights(rate, n, doc_col, doc_row, prev_doc, cfg.chunk, cfg.has_segments)


def _forward_kernel(rate_ref, doc_ref, q_ref, k_ref, v_ref, s0_ref, *out_refs, cfg: KernelConfig,
                    state_only: bool = False):
    """One (batch row or sequence piece, head, value block). state_only: q unused, no o, just the final state."""
    o_ref, sf_ref = (None, *out_refs) if state_only else out_refs
    rate = _rate(rate_ref)
    split_len = k_ref.shape[0]
    offset = (pl.program_id(0) % cfg.splits) * split_len

    def body(i, carry):
        state, prev_doc = carry
        t0 = pl.multiple_of(i * cfg.chunk, cfg.chunk)
        rows = pl.ds(t0, cfg.chunk)
        wts = _chunk_weights(cfg, rate, doc_ref, t0, prev_doc, offset)
        if state_only:
            state = chunk_math.state_update(k_ref[rows, :], v_ref[rows, :], state, wts)
        else:
            out, state = chunk_math.forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], state, wts, cfg.scale)
            o_ref[rows, :] = out.astype(o_ref.dtype)
        return state, wts.last_doc

    state, _ = jax.lax.fori_loop(0, split_len // cfg.chunk, body, (s0_ref[...], jnp.int32(0)))
    sf_ref[...] = state


def _dq_kernel(rate_ref, doc_ref, do_ref, k_ref, v_ref, s0_ref, dq_ref, *, cfg: KernelConfig):
    rate = _rate(rate_ref)

    def body(i, carry):
        state, prev_doc = carry
        t0 = pl.multiple_of(i * cfg.chunk, cfg.chunk)
        rows = pl.ds(t0, cfg.chunk)
        wts = _chunk_weights(cfg, rate, doc_ref, t0, prev_doc)
        dq, state = chunk_math.backward_dq(do_ref[rows, :], k_ref[rows, :], v_ref[rows, :], state, wts, cfg.scale)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return state, wts.last_doc

    num_chunks = do_ref.shape[0] // cfg.chunk
    jax.lax.fori_loop(0, num_chunks, body, (s0_ref[...], jnp.int32(0)))


def _backward_in_time(cfg: KernelConfig, doc_ref, num_chunks, chunk_step, dstate):
    """Runs chunk_step(t0, prev_doc, dstate) -> dstate from the last chunk to the first."""

    def body(step, carry):
        i = num_chunks - 1 - step
        t0 = pl.multiple_of(i * cfg.chunk, cfg.chunk)
        if cfg.has_segments:  # document of the token before the chunk (doc ids are non-decreasing)
            before = jnp.max(doc_ref[pl.ds(jnp.maximum(t0 - cfg.chunk, 0), cfg.chunk)])
            prev_doc = jnp.where(i > 0, before, 0)
        else:
            prev_doc = jnp.int32(0)
        return chunk_step(t0, prev_doc, carry)

    return jax.lax.fori_loop(0, num_chunks, body, dstate)


def _dk_kernel(rate_ref, doc_ref, q_ref, v_ref, do_ref, dsf_ref, dk_ref, ds0_ref, *, cfg: KernelConfig):
    """One key block: dk[:, block] and rows `block` of the initial state's gradient."""
    rate = _rate(rate_ref)

    def chunk_step(t0, prev_doc, dstate):
        rows = pl.ds(t0, cfg.chunk)
        wts = _chunk_weights(cfg, rate, doc_ref, t0, prev_doc)
        dk, dstate = chunk_math.backward_dk(q_ref[rows, :], v_ref[rows, :], do_ref[rows, :], dstate, wts, cfg.scale)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        return dstate

    ds0_ref[...] = _backward_in_time(cfg, doc_ref, q_ref.shape[0] // cfg.chunk, chunk_step, dsf_ref[...])


def _dv_kernel(rate_ref, doc_ref, q_ref, k_ref, do_ref, dsf_ref, dv_ref, *, cfg: KernelConfig):
    """One value block: dv[:, block]."""
    rate = _rate(rate_ref)

    def chunk_step(t0, prev_doc, dstate):
        rows = pl.ds(t0, cfg.chunk)
        wts = _chunk_weights(cfg, rate, doc_ref, t0, prev_doc)
        dv, dstate = chunk_math.backward_dv(q_ref[rows, :], k_ref[rows, :], do_ref[rows, :], dstate, wts, cfg.scale)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return dstate

    _backward_in_time(cfg, doc_ref, q_ref.shape[0] // cfg.chunk, chunk_step, dsf_ref[...])


def _seq_spec(seq_len: int, width: int, block_index):
    """[batch, seq, heads, width] tensor: one (batch, head) row of `width` columns per program."""
    return pl.BlockSpec((None, seq_len, None, width), block_index)


def _forward_pass(q, k, v, rate_tab, doc, s0, cfg: KernelConfig, state_only: bool = False):
    """q, k, v [rows, seq, heads, head_dim] (rows = batch * splits); returns (o or None, state [rows, H, D, D])."""
    batch, seq_len, heads, head_dim = k.shape
    block_v = min(cfg.block_v, head_dim)
    state_spec = pl.BlockSpec((None, None, head_dim, block_v), lambda b, h, j: (b, h, 0, j))
    out_seq = _seq_spec(seq_len, block_v, lambda b, h, j: (b, 0, h, j))
    state_shape = jax.ShapeDtypeStruct(s0.shape, jnp.float32)
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, state_only=state_only),
        grid=(batch, heads, head_dim // block_v),
        in_specs=[
            pl.BlockSpec((None, _RATE_WIDTH), lambda b, h, j: (h, 0)),
            pl.BlockSpec((None, seq_len), lambda b, h, j: (b, 0)),
            _seq_spec(seq_len, head_dim, lambda b, h, j: (b, 0, h, 0)),
            _seq_spec(seq_len, head_dim, lambda b, h, j: (b, 0, h, 0)),
            _seq_spec(seq_len, block_v, lambda b, h, j: (b, 0, h, j)),
            state_spec,
        ],
        out_specs=[state_spec] if state_only else [out_seq, state_spec],
        out_shape=[state_shape] if state_only else [jax.ShapeDtypeStruct(q.shape, q.dtype), state_shape],
        compiler_params=_params(cfg, cfg.num_warps),
        interpret=cfg.interpret,
        name="lightning_chunk_states" if state_only else "lightning_forward",
    )(rate_tab, doc, q, k, v, s0)
    return (None, outs[0]) if state_only else tuple(outs)


def _forward_call(q, k, v, rate_tab, doc, s0, cfg: KernelConfig):
    """Single pass when cfg.splits == 1. Otherwise the sequence is cut into `splits` pieces run as extra batch
    rows (more programs in flight when batch * heads is small): a state-only pass gives each piece's local final
    state, a short scan over pieces gives each piece's incoming state, then the forward pass runs on all pieces."""
    if cfg.splits == 1:
        return _forward_pass(q, k, v, rate_tab, doc, s0, cfg)
    batch, seq_len, heads, head_dim = q.shape
    splits, split_len = cfg.splits, seq_len // cfg.splits
    fold = lambda x: x.reshape(batch * splits, split_len, *x.shape[2:])
    doc = doc.reshape(batch, splits, split_len)
    doc_before = jnp.concatenate([jnp.zeros((batch, 1), doc.dtype), doc[:, :-1, -1]], axis=1)
    doc = (doc - doc_before[..., None]).reshape(batch * splits, split_len)  # each piece starts in document 0
    qf, kf, vf = fold(q), fold(k), fold(v)
    zeros = jnp.zeros((batch * splits, heads, head_dim, head_dim), jnp.float32)
    _, local = _forward_pass(qf, kf, vf, rate_tab, doc, zeros, cfg, state_only=True)
    real = jnp.clip(cfg.seq - split_len * jnp.arange(splits), 0, split_len).astype(jnp.float32)  # [splits]
    carried = doc.reshape(batch, splits, split_len)[:, :, -1] == 0  # no document starts in the piece
    keep = jnp.exp(-rate_tab[:, 0][None, None, :] * real[None, :, None]) * carried[..., None]  # [b, splits, h]

    def step(state, xs):
        keep_p, local_p = xs
        return keep_p[..., None, None] * state + local_p, state

    local = local.reshape(batch, splits, heads, head_dim, head_dim)
    final_state, incoming = jax.lax.scan(step, s0, (jnp.moveaxis(keep, 1, 0), jnp.moveaxis(local, 1, 0)))
    incoming = jnp.moveaxis(incoming, 0, 1).reshape(batch * splits, heads, head_dim, head_dim)
    out, _ = _forward_pass(qf, kf, vf, rate_tab, doc, incoming, cfg)
    return out.reshape(q.shape), final_state


def _auto_splits(batch: int, heads: int, seq: int, cfg: KernelConfig, head_dim: int) -> int:
    """Pieces per sequence so that about `target_programs` forward programs run at once (pieces >= 16 chunks)."""
    programs = batch * heads * max(1, head_dim // cfg.block_v)
    splits = 1
    while programs * splits * 2 <= cfg.target_programs and seq >= cfg.chunk * 16 * splits * 2:
        splits *= 2
    return splits


def _backward_call(q, k, v, rate_tab, doc, s0, do, dsf, cfg: KernelConfig):
    batch, seq_len, heads, head_dim = q.shape
    block = min(cfg.block_k, head_dim)
    grid = (batch, heads, head_dim // block)
    rate_spec = pl.BlockSpec((None, _RATE_WIDTH), lambda b, h, j: (h, 0))
    doc_spec = pl.BlockSpec((None, seq_len), lambda b, h, j: (b, 0))
    full = _seq_spec(seq_len, head_dim, lambda b, h, j: (b, 0, h, 0))
    part = _seq_spec(seq_len, block, lambda b, h, j: (b, 0, h, j))
    state_rows = pl.BlockSpec((None, None, block, head_dim), lambda b, h, j: (b, h, j, 0))
    state_cols = pl.BlockSpec((None, None, head_dim, block), lambda b, h, j: (b, h, 0, j))

    def call(kernel, in_specs, out_specs, out_shape, name):
        return pl.pallas_call(
            functools.partial(kernel, cfg=cfg),
            grid=grid,
            in_specs=[rate_spec, doc_spec, *in_specs],
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=_params(cfg, cfg.bwd_num_warps),
            interpret=cfg.interpret,
            name=name,
        )

    dq = call(_dq_kernel, [full, part, full, state_rows], part, jax.ShapeDtypeStruct(q.shape, q.dtype),
              "lightning_backward_dq")(rate_tab, doc, do, k, v, s0)
    dk, ds0 = call(_dk_kernel, [part, full, full, state_rows], [part, state_rows],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
                   "lightning_backward_dk")(rate_tab, doc, q, v, do, dsf)
    dv = call(_dv_kernel, [full, full, part, state_cols], part, jax.ShapeDtypeStruct(v.shape, v.dtype),
              "lightning_backward_dv")(rate_tab, doc, q, k, do, dsf)
    return dq, dk, dv, ds0


_lightning = kernel_vjp(_forward_call, _backward_call)


def lightning_attention_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    **tuning,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `lightning_attention_reference`; `tuning` overrides `KernelConfig` fields."""
    validate_inputs(q, k, v, decay_rate, initial_state, segment_ids)
    batch, seq, heads, head_dim = q.shape
    cfg = KernelConfig(seq=seq, scale=default_scale(head_dim, scale), has_segments=segment_ids is not None,
                       interpret=interpret, **tuning)
    if cfg.splits == 0:
        cfg = dataclasses.replace(cfg, splits=_auto_splits(batch, heads, seq, cfg, head_dim))
    multiple = cfg.chunk * cfg.splits
    rate_tab = jnp.broadcast_to(decay_rate.astype(jnp.float32)[:, None], (heads, _RATE_WIDTH))
    doc = pad_to_multiple(document_index(segment_ids, batch, seq), 1, multiple, edge=True)
    qp, kp, vp = (pad_to_multiple(x, 1, multiple) for x in (q, k, v))
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32)
    out, final_state = _lightning(qp, kp, vp, rate_tab, doc, initial_state.astype(jnp.float32), cfg)
    return out[:, :seq], final_state


def _decode_kernel(rate_ref, q_ref, k_ref, v_ref, s_ref, o_ref, s_out_ref, *, scale: float):
    decay = jnp.exp(-_rate(rate_ref))
    k = k_ref[...].astype(jnp.float32)
    v = v_ref[...].astype(jnp.float32)
    state = decay * s_ref[...] + k[:, None] * v[None, :]
    s_out_ref[...] = state
    o_ref[...] = (scale * jnp.sum(q_ref[...].astype(jnp.float32)[:, None] * state, axis=0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_v", "num_warps", "interpret"), donate_argnames="state")
def _decode_call(q, k, v, decay_rate, state, *, scale, block_v, num_warps, interpret):
    batch, heads, head_dim = q.shape
    block_v = min(block_v, head_dim)
    rate_tab = jnp.broadcast_to(decay_rate.astype(jnp.float32)[:, None], (heads, _RATE_WIDTH))
    vec = pl.BlockSpec((None, None, head_dim), lambda b, h, j: (b, h, 0))
    vec_v = pl.BlockSpec((None, None, block_v), lambda b, h, j: (b, h, j))
    state_spec = pl.BlockSpec((None, None, head_dim, block_v), lambda b, h, j: (b, h, 0, j))
    return pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale),
        grid=(batch, heads, head_dim // block_v),
        in_specs=[pl.BlockSpec((None, _RATE_WIDTH), lambda b, h, j: (h, 0)), vec, vec, vec_v, state_spec],
        out_specs=[vec_v, state_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        input_output_aliases={4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="lightning_decode",
    )(rate_tab, q, k, v, state)


def lightning_decode_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
    block_v: int = 32,
    num_warps: int = 4,
) -> tuple[jax.Array, jax.Array]:
    """One decode step (contract of `lightning_decode_reference`); `state` (fp32) is donated and updated in place."""
    validate_decode_inputs(q, k, v, decay_rate, state)
    if state.dtype != jnp.float32:
        raise ValueError(f"state: expected float32, got {state.dtype}")
    return _decode_call(q, k, v, decay_rate, state, scale=default_scale(q.shape[-1], scale), block_v=block_v,
                        num_warps=num_warps, interpret=interpret)
