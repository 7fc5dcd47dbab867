"""Per-chunk lightning algebra shared by the Pallas kernels (Triton GPU and Mosaic TPU).

Everything here runs inside a kernel on one (batch, head) and one chunk of C tokens. Notation as in
`reference.py`: local positions p (1-based), decay mask M, inter-chunk weights qd = γ ⊙ exp(-rate p), state
weights w = exp(-rate (n - p)) [last document, real token], keep = exp(-rate n) [no new document], n = real
tokens in the chunk. The attention scale is folded into M and qd once (`decay_tables`), so no function here
multiplies by it again.
Vectors are kept 2-D ([C, 1] columns) because Mosaic TPU handles those layouts natively.
Matmul operands stay in the input dtype (bf16 on the tensor cores); accumulation, decay and state are fp32.

Rows past the real tokens (p > n) must hold zeros in the k, v (and do) operands; M and qd are not clamped to n,
so those rows' own outputs are meaningless (callers drop them) but they never leak into real rows: M is causal
and w is 0 there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DecayTables:
    """Chunk-invariant factors, computed once per program (before the loop over chunks)."""

    mask: jax.Array  # [C, C] fp32: scale * exp(-rate (c - j)) for j <= c, else 0
    q_decay: jax.Array  # [C, 1] fp32: scale * exp(-rate (c + 1))


@dataclasses.dataclass(frozen=True)
class ChunkWeights:
    mask: jax.Array  # [C, C] fp32: DecayTables.mask, zeroed across documents
    q_decay: jax.Array  # [C, 1] fp32: weight of the incoming state for query c (scale included)
    k_decay: jax.Array  # [C, 1] fp32: weight of token j in the outgoing state
    keep: jax.Array  # scalar fp32: weight of the incoming state in the outgoing state
    last_doc: jax.Array  # scalar int32: document of the chunk's last real token


def decay_tables(rate, chunk: int, scale: float) -> DecayTables:
    """rate: scalar fp32 (per-step decay exp(-rate))."""
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    causal = row >= col
    # The where on the exponent keeps exp() finite above the diagonal (fast decays would overflow).
    mask = jnp.where(causal, scale * jnp.exp(-rate * jnp.where(causal, row - col, 0).astype(jnp.float32)), 0.0)
    pos = (jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) + 1).astype(jnp.float32)
    return DecayTables(mask, scale * jnp.exp(-rate * pos))


def chunk_weights(tables: DecayTables, rate, n, doc_col, doc_row, prev_doc, has_segments: bool) -> ChunkWeights:
    """n: real tokens in the chunk (0..C); doc_col [C, 1] / doc_row [1, C] int32 non-decreasing (None without
    segments); prev_doc: document of the token before the chunk."""
    chunk = tables.mask.shape[0]
    index = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    to_end = jnp.maximum(n - 1 - index, 0).astype(jnp.float32)
    k_decay = jnp.where(index < n, jnp.exp(-rate * to_end), 0.0)
    keep = jnp.exp(-rate * jnp.asarray(n).astype(jnp.float32))
    if not has_segments:
        return ChunkWeights(tables.mask, tables.q_decay, k_decay, keep, prev_doc)
    # Document ids past the real tokens repeat the last real one (edge padding), so the max is the last real doc.
    last_doc = jnp.max(doc_col)
    mask = jnp.where(doc_col == doc_row, tables.mask, 0.0)
    q_decay = jnp.where(doc_col == prev_doc, tables.q_decay, 0.0)
    k_decay = jnp.where(doc_col == last_doc, k_decay, 0.0)
    keep = jnp.where(last_doc == prev_doc, keep, 0.0)
    return ChunkWeights(mask, q_decay, k_decay, keep, last_doc)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """fp32-accumulating 2-D matmul; fp32 operands use exact (IEEE) products, not TF32."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _scale_rows(x, weights):
    """Rows of x times fp32 weights [rows, 1], back in x's dtype (a matmul operand)."""
    return (x.astype(jnp.float32) * weights).astype(x.dtype)


def forward(q, k, v, state, wts: ChunkWeights):
    """q, k [C, Dk], v [C, Dv'], state [Dk, Dv'] fp32 -> (out [C, Dv'] fp32, new state)."""
    scores = (dot(q, k, trans_b=True) * wts.mask).astype(q.dtype)
    out = wts.q_decay * dot(q, state.astype(q.dtype)) + dot(scores, v)
    return out, state_update(k, v, state, wts)


def state_update(k, v, state, wts: ChunkWeights):
    """State after the chunk: keep * state + Σ_j w_j k_jᵀ v_j. k [C, Dk'], v [C, Dv'], state [Dk', Dv'].

    The weights go on the narrower operand (fewer elements to scale and convert)."""
    if k.shape[1] <= v.shape[1]:
        return wts.keep * state + dot(_scale_rows(k, wts.k_decay), v, trans_a=True)
    return wts.keep * state + dot(k, _scale_rows(v, wts.k_decay), trans_a=True)


def backward_dq(do, k, v, state, wts: ChunkWeights):
    """Forward-in-time pass. do, v [C, Dv], k [C, Dk'] (a key block), state [Dk', Dv] -> (dq [C, Dk'], new state)."""
    dscores = (dot(do, v, trans_b=True) * wts.mask).astype(do.dtype)
    dq = wts.q_decay * dot(do, state.astype(do.dtype), trans_b=True) + dot(dscores, k)
    return dq, state_update(k, v, state, wts)


def backward_dk(q_blk, v, do, dstate_blk, wts: ChunkWeights):
    """Backward-in-time pass for a key block. q_blk [C, Dk'], v, do [C, Dv], dstate_blk = rows Dk' of
    dL/d(state after the chunk) [Dk', Dv] -> (dk [C, Dk'], dL/d(state before the chunk) rows)."""
    dtype = q_blk.dtype
    dscores = (dot(do, v, trans_b=True) * wts.mask).astype(dtype)
    dk = wts.k_decay * dot(v, dstate_blk.astype(dtype), trans_b=True) + dot(dscores, q_blk, trans_a=True)
    return dk, wts.keep * dstate_blk + dot(_scale_rows(q_blk, wts.q_decay), do, trans_a=True)


def backward_dv(q, k, do_blk, dstate_blk, wts: ChunkWeights):
    """Backward-in-time pass for a value block. q, k [C, Dk], do_blk [C, Dv'], dstate_blk = columns Dv' of
    dL/d(state after the chunk) [Dk, Dv'] -> (dv [C, Dv'], dL/d(state before the chunk) columns)."""
    dtype = q.dtype
    scores = (dot(q, k, trans_b=True) * wts.mask).astype(dtype)
    dv = wts.k_decay * dot(k, dstate_blk.astype(dtype)) + dot(scores, do_blk, trans_a=True)
    return dv, wts.keep * dstate_blk + dot(_scale_rows(q, wts.q_decay), do_blk, trans_a=True)
