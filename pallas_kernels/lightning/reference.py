"""Pure-jnp lightning attention: chunked (training / prefill), token-recurrent, and single-step decode.

Recurrence per (batch, head) (docs/architecture.md#lightning-attention): S_t = exp(-rate) * S_{t-1} + k_tᵀ v_t,
o_t = scale * q_t S_t, with S reset to zero at every document start (segment id differs from the previous token's).
Decay and state math run in fp32.

Chunked form, for a chunk with local 1-based positions p_c and incoming state S_in:
  O = scale * [((Q Kᵀ) ⊙ M) V + diag(γ ⊙ exp(-rate p)) Q S_in],
  M_cj = exp(-rate (p_c - p_j)) [j <= c, same document],
  S_out = α S_in + Σ_j w_j k_jᵀ v_j,  α = exp(-rate n) [no document starts in the chunk],
  w_j = exp(-rate (n - p_j)) [j in the chunk's last document], γ_c = [token c still in the incoming document].
Padding tokens (up to a multiple of the chunk) have k = v = 0 and p clamped to n: they neither add to nor
decay S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.lightning.common import (
    default_scale,
    document_index,
    pad_to_multiple,
    validate_decode_inputs,
    validate_inputs,
)

_HI = jax.lax.Precision.HIGHEST


def _initial_state(initial_state, batch, heads, head_dim):
    if initial_state is None:
        return jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32)
    return initial_state.astype(jnp.float32)


def lightning_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Chunked lightning attention.

    Args:
      q, k, v: [batch, seq, heads, head_dim].
      decay_rate: [heads] positive; the per-step decay is exp(-decay_rate).
      scale: multiplies q·k; default head_dim**-0.5.
      initial_state: [batch, heads, head_dim, head_dim] state before the first token (fp32), default zeros.
      segment_ids: [batch, seq] int; the state resets where the id differs from the previous token's.
      chunk_size: tokens per chunk (any sequence length works: padded internally).

    Returns:
      out [batch, seq, heads, head_dim] in q's dtype, final_state [batch, heads, head_dim, head_dim] fp32.
    """
    validate_inputs(q, k, v, decay_rate, initial_state, segment_ids)
    batch, seq, heads, head_dim = q.shape
    scale = default_scale(head_dim, scale)
    num_chunks = -(-seq // chunk_size)
    rate = decay_rate.astype(jnp.float32)

    def to_chunks(x, *, edge=False):  # [batch, seq, ...] -> [num_chunks, batch, chunk, ...]
        x = pad_to_multiple(x, 1, chunk_size, edge=edge)
        x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    qc, kc, vc = (to_chunks(x.astype(jnp.float32)) for x in (q, k, v))
    docs = to_chunks(document_index(segment_ids, batch, seq), edge=True)
    valid = jnp.clip(seq - chunk_size * jnp.arange(num_chunks), 0, chunk_size)
    local = jnp.arange(chunk_size)
    causal = local[:, None] >= local[None, :]

    def step(carry, xs):
        state, prev_doc = carry  # [b, h, dk, dv], [b]
        qi, ki, vi, doc, n = xs
        pos = jnp.minimum(local + 1, n).astype(jnp.float32)  # [c]
        delta = jnp.where(causal, pos[:, None] - pos[None, :], 0.0)
        same_doc = (doc[:, :, None] == doc[:, None, :]) & causal  # [b, c, j]
        mask = jnp.where(same_doc[:, None], jnp.exp(-rate[None, :, None, None] * delta), 0.0)  # [b, h, c, j]
        scores = jnp.einsum("bchd,bjhd->bhcj", qi, ki, precision=_HI) * mask
        o_intra = jnp.einsum("bhcj,bjhe->bche", scores, vi, precision=_HI)
        in_prev = (doc == prev_doc[:, None]).astype(jnp.float32)  # [b, c]
        q_decay = jnp.exp(-rate[None, :] * pos[:, None])[None] * in_prev[:, :, None]  # [b, c, h]
        o_inter = jnp.einsum("bchd,bhde->bche", qi, state, precision=_HI) * q_decay[..., None]
        out = scale * (o_intra + o_inter)

        last_doc = doc[:, -1]
        keep = jnp.exp(-rate[None, :] * n) * (last_doc == prev_doc)[:, None].astype(jnp.float32)  # [b, h]
        k_weight = jnp.exp(-rate[None, :, None] * (n - pos)[None, None, :]) * (
            (doc == last_doc[:, None])[:, None, :].astype(jnp.float32)
        )  # [b, h, c]
        new_state = keep[..., None, None] * state + jnp.einsum("bhc,bchd,bche->bhde", k_weight, ki, vi, precision=_HI)
        return (new_state, last_doc), out

    state0 = _initial_state(initial_state, batch, heads, head_dim)
    (final_state, _), out = jax.lax.scan(step, (state0, jnp.zeros((batch,), jnp.int32)), (qc, kc, vc, docs, valid))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_chunks * chunk_size, heads, head_dim)[:, :seq]
    return out.astype(q.dtype), final_state


def lightning_attention_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token lightning attention (same contract as `lightning_attention_reference`)."""
    validate_inputs(q, k, v, decay_rate, initial_state, segment_ids)
    batch, seq, heads, head_dim = q.shape
    scale = default_scale(head_dim, scale)
    decay = jnp.exp(-decay_rate.astype(jnp.float32))[None, :, None, None]
    doc = document_index(segment_ids, batch, seq)
    starts = jnp.concatenate([jnp.zeros((batch, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)

    def step(state, xs):
        qt, kt, vt, start = xs  # [b, h, d], [b]
        state = jnp.where(start[:, None, None, None], 0.0, decay * state)
        state = state + kt[..., :, None] * vt[..., None, :]
        return state, scale * jnp.einsum("bhd,bhde->bhe", qt, state, precision=_HI)

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v)) + (starts.T,)
    final_state, out = jax.lax.scan(step, _initial_state(initial_state, batch, heads, head_dim), xs)
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), final_state


def lightning_decode_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decode step. q, k, v [batch, heads, head_dim]; state [batch, heads, head_dim, head_dim] fp32.

    Returns out [batch, heads, head_dim] in q's dtype and the new fp32 state.
    """
    validate_decode_inputs(q, k, v, decay_rate, state)
    scale = default_scale(q.shape[-1], scale)
    decay = jnp.exp(-decay_rate.astype(jnp.float32))[None, :, None, None]
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    new_state = decay * state.astype(jnp.float32) + k32[..., :, None] * v32[..., None, :]
    out = scale * jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), new_state, precision=_HI)
    return out.astype(q.dtype), new_state
