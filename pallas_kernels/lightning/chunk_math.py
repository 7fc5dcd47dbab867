"""Per-chunk lightning algebra shared by the Pallas kernels (Triton GPU and Mosaic TPU).

Everything here runs inside a kernel on one (batch, head) and one chunk of C tokens. Notation as in
`reference.py`: local positions p (1-based, clamped to the chunk's n real tokens), decay mask M, inter-chunk weights
qd = γ ⊙ exp(-rate p), state weights w = exp(-rate (n - p)) [last document], keep = exp(-rate n) [no new document].
Vectors are kept 2-D ([C, 1] columns, [1, C] rows) because Mosaic TPU handles those layouts natively.
Matmul operands stay in the input dtype (bf16 on the tensor cores); accumulation, decay and state are fp32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ChunkWeights:
    mask: jax.Array  # [C, C] fp32: exp(-rate (p_c - p_j)) for j <= c in the same document, else 0
    q_decay: jax.Array  # [C, 1] fp32: weight of the incoming state for query c
    k_decay: jax.Array  # [C, 1] fp32: weight of token j in the outgoing state
    keep: jax.Array  # scalar fp32: weight of the incoming state in the outgoing state
    last_doc: jax.Array  # scalar int32: document of the chunk's last token


def chunk_weights(rate, n, doc_col, doc_row, prev_doc, chunk: int, has_segments: bool) -> ChunkWeights:
    """rate: scalar fp32; n: real tokens in the chunk; doc_col [C, 1] / doc_row [1, C] int32 non-decreasing."""
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    pos_col = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) + 1, n).astype(jnp.float32)
    pos_row = jnp.minimum(col + 1, n).astype(jnp.float32)
    pos_rows = jnp.minimum(row + 1, n).astype(jnp.float32)
    causal = row >= col
    if has_segments:
        causal = causal & (doc_col == doc_row)
    # The where on the exponent keeps exp() finite above the diagonal (fast decays would overflow).
    mask = jnp.where(causal, jnp.exp(-rate * jnp.where(causal, pos_rows - pos_row, 0.0)), 0.0)
    n_f = n.astype(jnp.float32) if hasattr(n, "astype") else jnp.float32(n)
    q_decay = jnp.exp(-rate * pos_col)
    k_decay = jnp.exp(-rate * (n_f - pos_col))
    keep = jnp.exp(-rate * n_f)
    if not has_segments:
        return ChunkWeights(mask, q_decay, k_decay, keep, prev_doc)
    last_doc = jnp.max(doc_col)
    q_decay = jnp.where(doc_col == prev_doc, q_decay, 0.0)
    k_decay = jnp.where(doc_col == last_doc, k_decay, 0.0)
    keep = jnp.where(last_doc == prev_doc, keep, 0.0)
    return ChunkWeights(mask, q_decay, k_decay, keep, last_doc)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """fp32-accumulating 2-D matmul; fp32 operands use exact (IEEE) products, not TF32."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def forward(q, k, v, state, wts: ChunkWeights, scale: float):
    """q, k [C, Dk], v [C, Dv], state [Dk, Dv] fp32 -> (out [C, Dv] fp32, new state)."""
    dtype = q.dtype
    scores = dot(q, k, trans_b=True) * wts.mask
    out = dot(scores.astype(dtype), v) + wts.q_decay * dot(q, state.astype(dtype))
    return scale * out, state_update(k, v, state, wts)


def state_update(k, v, state, wts: ChunkWeights):
    """State after the chunk: keep * state + Σ_j w_j k_jᵀ v_j. k [C, Dk'], v [C, Dv'], state [Dk', Dv']."""
    weighted_k = (k.astype(jnp.float32) * wts.k_decay).astype(k.dtype)
    return wts.keep * state + dot(weighted_k, v, trans_a=True)


def backward_dq(do, k, v, state, wts: ChunkWeights, scale: float):
    """Forward-in-time pass. do, v [C, Dv], k [C, Dk'] (a key block), state [Dk', Dv] -> (dq [C, Dk'], new state)."""
    dtype = do.dtype
    dscores = dot(do, v, trans_b=True) * wts.mask
    dq = dot(dscores.astype(dtype), k) + wts.q_decay * dot(do, state.astype(dtype), trans_b=True)
    return scale * dq, state_update(k, v, state, wts)


def backward_dk(q_blk, v, do, dstate_blk, wts: ChunkWeights, scale: float):
    """Backward-in-time pass for a key block. q_blk [C, Dk'], v, do [C, Dv], dstate_blk = rows Dk' of
    dL/d(state after the chunk) [Dk', Dv] -> (dk [C, Dk'], dL/d(state before the chunk) rows)."""
    dtype = q_blk.dtype
    dscores = dot(do, v, trans_b=True) * wts.mask
    dk = scale * dot(dscores.astype(dtype), q_blk, trans_a=True)
    dk = dk + wts.k_decay * dot(v, dstate_blk.astype(dtype), trans_b=True)
    weighted_q = (q_blk.astype(jnp.float32) * (scale * wts.q_decay)).astype(dtype)
    return dk, wts.keep * dstate_blk + dot(weighted_q, do, trans_a=True)


def backward_dv(q, k, do_blk, dstate_blk, wts: ChunkWeights, scale: float):
    """Backward-in-time pass for a value block. q, k [C, Dk], do_blk [C, Dv'], dstate_blk = columns Dv' of
    dL/d(state after the chunk) [Dk, Dv'] -> (dv [C, Dv'], dL/d(state before the chunk) columns)."""
    dtype = q.dtype
    scores = dot(q, k, trans_b=True) * wts.mask
    dv = scale * dot(scores.astype(dtype), do_blk, trans_a=True) + wts.k_decay * dot(k, dstate_blk.astype(dtype))
    weighted_q = (q.astype(jnp.float32) * (scale * wts.q_decay)).astype(dtype)
    return dv, wts.keep * dstate_blk + dot(weighted_q, do_blk, trans_a=True)
