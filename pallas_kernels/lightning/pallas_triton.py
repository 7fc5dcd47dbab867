"""Lightning attention Pallas kernels for NVIDIA GPUs, lowered through Triton.

Why Triton lowering: a plain `pallas_call` with BlockSpecs lowers through Triton on JAX 0.11.2 and 0.12, and runs
on CPU with `interpret=True` for CI. Mosaic GPU could go further (TMA, wgmma scheduling by hand) but needs its own
idioms that still move between JAX releases; the op is memory-bound (~100 FLOP per byte), so what decides speed
here is bytes, parallelism and the work per chunk step, which Triton lowering controls.

Kernels (the fp32 state block carried in registers over a loop of chunks; grids put the value/key block index
first so that the programs of one (batch, head) launch together and share q, k through L2):
- forward, one program per (value block, head, sequence piece, batch row). `splits` = 1: a single pass over the
  sequence, reading q, k, v once and writing o and the final state. `splits` > 1 (for shapes where batch * heads
  leaves SMs idle): a state kernel first computes each piece's own final state from zero (reads k, v; pieces run
  in parallel); the forward kernel then folds the earlier pieces' states into its incoming state (a few [D, block]
  loads in its prologue) and runs its piece. `tuning.forward_tuning` picks block_v, splits, warps and stages.
- backward: a dq kernel forward in time (rebuilding the state rows of its key block), then a dk kernel (key
  blocks) and a dv kernel (value blocks) backward in time, each carrying its rows / columns of dL/dstate exactly;
  the dk kernel's final dL/dstate is the initial state's gradient. Wired with `jax.custom_vjp`.
- decode: one token, state [batch, heads, head_dim, head_dim] fp32 updated in place (input/output aliased, donated).
No kernel pads q, k, v, o or their gradients: a sequence that is not a multiple of the chunk is handled by masked
loads (zeros past the end) and masked stores in its last chunk. `decay_rate` is treated as a constant (the model's
decay is a fixed buffer): it gets no gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.lightning import chunk_math, tuning
from pallas_kernels.lightning.common import (
    default_scale,
    document_index,
    kernel_vjp,
    validate_decode_inputs,
    validate_inputs,
)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings (hashable: used as a custom_vjp non-differentiable argument).

    The forward fields (chunk, block_v, splits, num_warps, num_stages) default to `tuning.forward_tuning` of the
    shape; the backward kernels use their own (bwd_*, block_k).
    """

    seq: int  # sequence length
    scale: float
    has_segments: bool
    chunk: int = 64  # forward tokens per step
    block_v: int = 32  # value columns per forward program
    splits: int = 1  # forward sequence pieces (1: single pass)
    num_warps: int = 4
    num_stages: int = 3
    bwd_chunk: int = 64
    block_k: int = 32  # key (dq, dk) or value (dv) columns per backward program
    bwd_num_warps: int = 4
    bwd_num_stages: int = 3
    interpret: bool = False


def piece_layout(seq: int, chunk: int, splits: int) -> tuple[int, int]:
    """(piece length, number of pieces) for cutting `seq` tokens into about `splits` pieces of whole chunks.

    Every piece but the last is full; there are fewer than `splits` pieces when the chunks do not go round.
    """
    chunks = -(-seq // chunk)
    per_piece = -(-chunks // max(1, splits))
    return per_piece * chunk, -(-chunks // per_piece)


def _chunk_rows(ref, t0, n, cfg: KernelConfig):
    """Rows [t0, t0 + chunk) of a [rows, width] ref. n: real rows, a Python int for a full chunk; otherwise the
    rows past n (beyond the end of the array) read as zeros."""
    rows = ref.at[pl.ds(t0, cfg.chunk), :]
    if isinstance(n, int) and n == cfg.chunk:
        return rows[...]
    return plgpu.load(rows, mask=jax.lax.broadcasted_iota(jnp.int32, (cfg.chunk, 1), 0) < n, other=0)


def _store_chunk_rows(ref, t0, n, value, cfg: KernelConfig):
    rows = ref.at[pl.ds(t0, cfg.chunk), :]
    value = value.astype(ref.dtype)
    if isinstance(n, int) and n == cfg.chunk:
        rows[...] = value
    else:
        plgpu.store(rows, value, mask=jax.lax.broadcasted_iota(jnp.int32, (cfg.chunk, 1), 0) < n)


def _run_chunks(cfg: KernelConfig, step, carry, num_full, tail, *, reverse: bool = False):
    """Runs carry = step(t0, n, carry) over `num_full` full chunks (n = chunk) and then, when `tail` holds, the
    partial chunk after them (n = tokens left); `reverse` visits the same chunks last to first.

    num_full, tail: Python values or traced scalars. The full chunks get unmasked loads (the main loop stays lean);
    only the tail step masks rows past the end of the sequence."""
    seq_left = cfg.seq % cfg.chunk

    def full(i, carry):
        index = num_full - 1 - i if reverse else i
        return step(pl.multiple_of(index * cfg.chunk, cfg.chunk), cfg.chunk, carry)

    def partial(carry):
        t0 = num_full * cfg.chunk
        return step(t0 if isinstance(t0, int) else pl.multiple_of(t0, cfg.chunk), seq_left, carry)

    if tail is False or seq_left == 0:
        return jax.lax.fori_loop(0, num_full, full, carry)

    def run_tail(carry):
        if tail is True:
            return partial(carry)
        return jax.lax.fori_loop(0, tail.astype(jnp.int32), lambda _, c: partial(c), carry)  # 0 or 1 steps

    if reverse:
        return jax.lax.fori_loop(0, num_full, full, run_tail(carry))
    return run_tail(jax.lax.fori_loop(0, num_full, full, carry))


def _doc_before(doc_ref, start):
    """Document of the token before `start` (document 0, the initial state's, before the first token)."""
    return jnp.where(start > 0, doc_ref[jnp.maximum(start - 1, 0)], 0)


def _weights(cfg: KernelConfig, tables, rate, doc_ref, start, n, prev_doc):
    """Weights of the chunk of `n` real tokens starting at token `start` (doc_ref: the whole padded row)."""
    if not cfg.has_segments:
        return chunk_math.chunk_weights(tables, rate, n, None, None, prev_doc, False)
    doc = doc_ref[pl.ds(start, cfg.chunk)]
    return chunk_math.chunk_weights(tables, rate, n, doc[:, None], doc[None, :], prev_doc, True)


def _initial_doc(cfg: KernelConfig, doc_ref, start):
    return _doc_before(doc_ref, start) if cfg.has_segments else jnp.int32(0)


def _with_optional_refs(kernel, present: tuple[bool, ...]):
    """Pallas passes refs only for the inputs that exist; re-insert None for the absent leading ones."""

    def wrapped(*refs):
        refs = iter(refs)
        return kernel(*[next(refs) if here else None for here in present], *refs)

    return wrapped


# ---------------------------------------------------------------------------------------------------- forward


def _piece_state_kernel(rate_ref, doc_ref, k_ref, v_ref, local_ref, *, cfg: KernelConfig):
    """Program (value block, head, piece, batch row): the piece's final state started from zero.

    Only the pieces before the last run here, and those are full."""
    rate = rate_ref[pl.program_id(1)]
    tables = chunk_math.decay_tables(rate, cfg.chunk, cfg.scale)
    piece_len = k_ref.shape[0]
    start = pl.program_id(2) * piece_len

    def step(t0, n, carry):
        state, prev_doc = carry
        wts = _weights(cfg, tables, rate, doc_ref, start + t0, n, prev_doc)
        k, v = (_chunk_rows(ref, t0, n, cfg) for ref in (k_ref, v_ref))
        return chunk_math.state_update(k, v, state, wts), wts.last_doc

    zeros = jnp.zeros(local_ref.shape, jnp.float32)
    local_ref[...], _ = _run_chunks(
        cfg, step, (zeros, _initial_doc(cfg, doc_ref, start)), piece_len // cfg.chunk, False
    )


def _incoming_state(cfg: KernelConfig, s0, local_ref, doc_ref, rate, piece, piece_len):
    """State before `piece`: s0 carried through the earlier (full) pieces, each one decaying what came before it
    by exp(-rate * piece_len) (or resetting it when a document starts inside) and adding its own final state."""
    keep = jnp.exp(-rate * jnp.float32(piece_len))

    def body(i, state):
        if cfg.has_segments:
            carried = doc_ref[(i + 1) * piece_len - 1] == _doc_before(doc_ref, i * piece_len)
            return jnp.where(carried, keep, 0.0) * state + local_ref[i]
        return keep * state + local_ref[i]

    return jax.lax.fori_loop(0, piece, body, s0)


def _forward_kernel(
    rate_ref, doc_ref, q_ref, k_ref, v_ref, s0_ref, local_ref, o_ref, sf_ref, *, cfg: KernelConfig, pieces: int
):
    """Program (value block, head, piece, batch row): o for the piece's tokens and the block's columns."""
    rate = rate_ref[pl.program_id(1)]
    tables = chunk_math.decay_tables(rate, cfg.chunk, cfg.scale)
    piece_len = q_ref.shape[0]
    piece = pl.program_id(2)
    start = piece * piece_len
    state = s0_ref[...]
    if pieces > 1:
        state = _incoming_state(cfg, state, local_ref, doc_ref, rate, piece, piece_len)

    def step(t0, n, carry):
        state, prev_doc = carry
        wts = _weights(cfg, tables, rate, doc_ref, start + t0, n, prev_doc)
        q, k, v = (_chunk_rows(ref, t0, n, cfg) for ref in (q_ref, k_ref, v_ref))
        out, state = chunk_math.forward(q, k, v, state, wts)
        _store_chunk_rows(o_ref, t0, n, out, cfg)
        return state, wts.last_doc

    if pieces == 1:
        num_full, tail = cfg.seq // cfg.chunk, True
    else:  # only the last piece can be short, and only it can end in a partial chunk
        num_full, tail = jnp.minimum(cfg.seq - start, piece_len) // cfg.chunk, piece == pieces - 1
    state, _ = _run_chunks(cfg, step, (state, _initial_doc(cfg, doc_ref, start)), num_full, tail)

    @pl.when(piece == pieces - 1)  # the last piece ends where the sequence ends
    def _():
        sf_ref[...] = state


def _forward_call(q, k, v, rate, doc, s0, cfg: KernelConfig):
    """q, k, v [batch, seq, heads, head_dim]; rate [heads] fp32; doc None or [batch, pieces * piece_len] int32
    (document index, edge-padded); s0 [batch, heads, head_dim, head_dim] fp32 -> (o, final state)."""
    batch, seq, heads, head_dim = q.shape
    block_v = min(cfg.block_v, head_dim)
    piece_len, pieces = piece_layout(seq, cfg.chunk, cfg.splits)
    has_doc = doc is not None

    def index(*block):  # BlockSpec index map over the grid (value block, head, piece, batch row)
        return lambda j, h, p, b: tuple(dict(j=j, h=h, p=p, b=b).get(x, 0) for x in block)

    rate_spec = pl.BlockSpec((heads,), lambda j, h, p, b: (0,))
    doc_specs = [pl.BlockSpec((None, doc.shape[1]), index("b", 0))] if has_doc else []
    full = pl.BlockSpec((None, piece_len, None, head_dim), index("b", "p", "h", 0))
    part = pl.BlockSpec((None, piece_len, None, block_v), index("b", "p", "h", "j"))
    state_spec = pl.BlockSpec((None, None, head_dim, block_v), index("b", "h", 0, "j"))
    docs = [doc] if has_doc else []
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    local_specs, locals_ = [], []
    if pieces > 1:
        local_shape = (batch, pieces - 1, heads, head_dim, head_dim)
        locals_ = [
            pl.pallas_call(
                _with_optional_refs(functools.partial(_piece_state_kernel, cfg=cfg), (True, has_doc)),
                grid=(head_dim // block_v, heads, pieces - 1, batch),
                in_specs=[rate_spec, *doc_specs, full, part],
                out_specs=pl.BlockSpec((None, None, None, head_dim, block_v), index("b", "p", "h", 0, "j")),
                out_shape=jax.ShapeDtypeStruct(local_shape, jnp.float32),
                compiler_params=params,
                interpret=cfg.interpret,
                name="lightning_piece_states",
            )(rate, *docs, k, v)
        ]
        local_specs = [pl.BlockSpec((None, pieces - 1, None, head_dim, block_v), index("b", 0, "h", 0, "j"))]
    kernel = functools.partial(_forward_kernel, cfg=cfg, pieces=pieces)
    present = (True, has_doc, True, True, True, True, pieces > 1)
    return pl.pallas_call(
        _with_optional_refs(kernel, present),
        grid=(head_dim // block_v, heads, pieces, batch),
        in_specs=[rate_spec, *doc_specs, full, full, part, state_spec, *local_specs],
        out_specs=[part, state_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="lightning_forward",
    )(rate, *docs, q, k, v, s0, *locals_)


# --------------------------------------------------------------------------------------------------- backward


def _dq_kernel(rate_ref, doc_ref, do_ref, k_ref, v_ref, s0_ref, dq_ref, *, cfg: KernelConfig):
    rate = rate_ref[pl.program_id(1)]
    tables = chunk_math.decay_tables(rate, cfg.chunk, cfg.scale)

    def step(t0, n, carry):
        state, prev_doc = carry
        wts = _weights(cfg, tables, rate, doc_ref, t0, n, prev_doc)
        do, k, v = (_chunk_rows(ref, t0, n, cfg) for ref in (do_ref, k_ref, v_ref))
        dq, state = chunk_math.backward_dq(do, k, v, state, wts)
        _store_chunk_rows(dq_ref, t0, n, dq, cfg)
        return state, wts.last_doc

    _run_chunks(cfg, step, (s0_ref[...], jnp.int32(0)), cfg.seq // cfg.chunk, True)


def _backward_in_time(cfg: KernelConfig, rate_ref, doc_ref, chunk_step, dstate):
    """Runs dstate = chunk_step(t0, n, wts, dstate) from the last chunk to the first."""
    rate = rate_ref[pl.program_id(1)]
    tables = chunk_math.decay_tables(rate, cfg.chunk, cfg.scale)

    def step(t0, n, dstate):
        return chunk_step(t0, n, _weights(cfg, tables, rate, doc_ref, t0, n, _initial_doc(cfg, doc_ref, t0)), dstate)

    return _run_chunks(cfg, step, dstate, cfg.seq // cfg.chunk, True, reverse=True)


def _dk_kernel(rate_ref, doc_ref, q_ref, v_ref, do_ref, dsf_ref, dk_ref, ds0_ref, *, cfg: KernelConfig):
    """One key block: dk[:, block] and rows `block` of the initial state's gradient."""

    def chunk_step(t0, n, wts, dstate):
        q, v, do = (_chunk_rows(ref, t0, n, cfg) for ref in (q_ref, v_ref, do_ref))
        dk, dstate = chunk_math.backward_dk(q, v, do, dstate, wts)
        _store_chunk_rows(dk_ref, t0, n, dk, cfg)
        return dstate

    ds0_ref[...] = _backward_in_time(cfg, rate_ref, doc_ref, chunk_step, dsf_ref[...])


def _dv_kernel(rate_ref, doc_ref, q_ref, k_ref, do_ref, dsf_ref, dv_ref, *, cfg: KernelConfig):
    """One value block: dv[:, block]."""

    def chunk_step(t0, n, wts, dstate):
        q, k, do = (_chunk_rows(ref, t0, n, cfg) for ref in (q_ref, k_ref, do_ref))
        dv, dstate = chunk_math.backward_dv(q, k, do, dstate, wts)
        _store_chunk_rows(dv_ref, t0, n, dv, cfg)
        return dstate

    _backward_in_time(cfg, rate_ref, doc_ref, chunk_step, dsf_ref[...])


def _backward_call(q, k, v, rate, doc, s0, do, dsf, cfg: KernelConfig):
    cfg = dataclasses.replace(cfg, chunk=cfg.bwd_chunk)  # the kernels below step by cfg.chunk
    batch, seq, heads, head_dim = q.shape
    block = min(cfg.block_k, head_dim)
    seq_blocks = -(-seq // cfg.chunk) * cfg.chunk
    has_doc = doc is not None
    rate_spec = pl.BlockSpec((heads,), lambda j, h, b: (0,))
    doc_specs = [pl.BlockSpec((None, doc.shape[1]), lambda j, h, b: (b, 0))] if has_doc else []
    docs = [doc] if has_doc else []
    full = pl.BlockSpec((None, seq_blocks, None, head_dim), lambda j, h, b: (b, 0, h, 0))
    part = pl.BlockSpec((None, seq_blocks, None, block), lambda j, h, b: (b, 0, h, j))
    state_rows = pl.BlockSpec((None, None, block, head_dim), lambda j, h, b: (b, h, j, 0))
    state_cols = pl.BlockSpec((None, None, head_dim, block), lambda j, h, b: (b, h, 0, j))

    def call(kernel, in_specs, out_specs, out_shape, name):
        return pl.pallas_call(
            _with_optional_refs(functools.partial(kernel, cfg=cfg), (True, has_doc)),
            grid=(head_dim // block, heads, batch),
            in_specs=[rate_spec, *doc_specs, *in_specs],
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages),
            interpret=cfg.interpret,
            name=name,
        )

    dq = call(
        _dq_kernel,
        [full, part, full, state_rows],
        part,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        "lightning_backward_dq",
    )(rate, *docs, do, k, v, s0)
    dk, ds0 = call(
        _dk_kernel,
        [part, full, full, state_rows],
        [part, state_rows],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)],
        "lightning_backward_dk",
    )(rate, *docs, q, v, do, dsf)
    dv = call(
        _dv_kernel,
        [full, full, part, state_cols],
        part,
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        "lightning_backward_dv",
    )(rate, *docs, q, k, do, dsf)
    return dq, dk, dv, ds0


_lightning = kernel_vjp(_forward_call, _backward_call)


_TUNABLE = tuple(
    f.name for f in dataclasses.fields(KernelConfig) if f.name not in ("seq", "scale", "has_segments", "interpret")
)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def kernel_config(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    *,
    scale: float,
    has_segments: bool,
    itemsize: int = 2,
    interpret: bool = False,
    **tuning_options,
) -> KernelConfig:
    """KernelConfig for a shape: forward fields from `tuning.forward_tuning`, then `tuning_options` on top."""
    unknown = sorted(set(tuning_options) - set(_TUNABLE))
    if unknown:
        raise ValueError(f"kernel options {unknown}: unknown; the tunable ones are {list(_TUNABLE)}")
    if not _is_power_of_two(head_dim) or (head_dim < 16 and not interpret):  # tensor-core matmuls need K >= 16
        raise ValueError(f"q: head_dim {head_dim} must be a power of two (>= 16 on a GPU) for the Triton kernels")
    chunk = tuning_options.get("chunk")
    picked = dataclasses.asdict(tuning.forward_tuning(batch, seq, heads, head_dim, chunk=chunk, itemsize=itemsize))
    cfg = KernelConfig(
        seq=seq, scale=scale, has_segments=has_segments, interpret=interpret, **{**picked, **tuning_options}
    )
    for name in ("chunk", "bwd_chunk", "block_v", "block_k"):
        value = getattr(cfg, name)
        if not _is_power_of_two(value):
            raise ValueError(f"{name}={value}: expected a power of two")
    if cfg.splits < 1:
        raise ValueError(f"splits={cfg.splits}: expected >= 1")
    return cfg


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
    **tuning_options,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `lightning_attention_reference`; `tuning_options` override `KernelConfig` fields."""
    validate_inputs(q, k, v, decay_rate, initial_state, segment_ids)
    batch, seq, heads, head_dim = q.shape
    cfg = kernel_config(
        batch,
        seq,
        heads,
        head_dim,
        scale=default_scale(head_dim, scale),
        has_segments=segment_ids is not None,
        itemsize=jnp.dtype(q.dtype).itemsize,
        interpret=interpret,
        **tuning_options,
    )
    doc = None
    if segment_ids is not None:  # padded (edge) to cover the forward's pieces and the backward's chunks
        piece_len, pieces = piece_layout(seq, cfg.chunk, cfg.splits)
        doc_len = max(piece_len * pieces, -(-seq // cfg.bwd_chunk) * cfg.bwd_chunk)
        doc = jnp.pad(document_index(segment_ids, batch, seq), ((0, 0), (0, doc_len - seq)), mode="edge")
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32)
    return _lightning(q, k, v, decay_rate.astype(jnp.float32), doc, initial_state.astype(jnp.float32), cfg)


# ----------------------------------------------------------------------------------------------------- decode


def _decode_kernel(rate_ref, q_ref, k_ref, v_ref, s_ref, o_ref, s_out_ref, *, scale: float):
    decay = jnp.exp(-rate_ref[pl.program_id(1)])
    k = k_ref[...].astype(jnp.float32)
    v = v_ref[...].astype(jnp.float32)
    state = decay * s_ref[...] + k[:, None] * v[None, :]
    s_out_ref[...] = state
    o_ref[...] = (scale * jnp.sum(q_ref[...].astype(jnp.float32)[:, None] * state, axis=0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_v", "num_warps", "interpret"), donate_argnames="state")
def _decode_call(q, k, v, decay_rate, state, *, scale, block_v, num_warps, interpret):
    batch, heads, head_dim = q.shape
    block_v = min(block_v, head_dim)
    vec = pl.BlockSpec((None, None, head_dim), lambda j, h, b: (b, h, 0))
    vec_v = pl.BlockSpec((None, None, block_v), lambda j, h, b: (b, h, j))
    state_spec = pl.BlockSpec((None, None, head_dim, block_v), lambda j, h, b: (b, h, 0, j))
    return pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale),
        grid=(head_dim // block_v, heads, batch),
        in_specs=[pl.BlockSpec((heads,), lambda j, h, b: (0,)), vec, vec, vec_v, state_spec],
        out_specs=[vec_v, state_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        input_output_aliases={4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="lightning_decode",
    )(decay_rate.astype(jnp.float32), q, k, v, state)


def lightning_decode_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decode step (contract of `lightning_decode_reference`); `state` (fp32) is donated and updated in place.

    block_v / num_warps default to `tuning.decode_tuning` of the shape."""
    validate_decode_inputs(q, k, v, decay_rate, state)
    if state.dtype != jnp.float32:
        raise ValueError(f"state: expected float32, got {state.dtype}")
    batch, heads, head_dim = q.shape
    picked = tuning.decode_tuning(batch, heads, head_dim)
    return _decode_call(
        q,
        k,
        v,
        decay_rate,
        state,
        scale=default_scale(head_dim, scale),
        block_v=picked.block_v if block_v is None else block_v,
        num_warps=picked.num_warps if num_warps is None else num_warps,
        interpret=interpret,
    )
