"""Helpers for the lightning tests: random inputs and the float64 NumPy recurrence of
docs/architecture.md#lightning-attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_inputs(
    seed: int,
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    *,
    rates,
    dtype=jnp.float32,
    with_state: bool = True,
    segment_starts=None,
):
    """q, k, v [batch, seq, heads, head_dim], decay_rate [heads], initial_state or None, segment_ids or None.

    segment_starts: token indices where a new document begins (the same for every batch row, shifted by the
    row index so rows differ).
    """
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32).astype(dtype) for kk in keys[:3])
    decay_rate = jnp.asarray(rates, jnp.float32)
    assert decay_rate.shape == (heads,)
    state = jax.random.normal(keys[3], (batch, heads, head_dim, head_dim), jnp.float32) if with_state else None
    segment_ids = None
    if segment_starts is not None:
        ids = np.zeros((batch, seq), np.int32)
        for b in range(batch):
            for start in segment_starts:
                start = min(seq - 1, start + b)
                ids[b, start:] += 1
        segment_ids = jnp.asarray(ids + 7)  # ids need not start at 0
    return q, k, v, decay_rate, state, segment_ids


def numpy_recurrence(q, k, v, decay_rate, scale, initial_state=None, segment_ids=None):
    """In float64: S_t = λ S_{t-1} + k_tᵀ v_t (S reset at document starts), o_t = scale q_t S_t."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq, heads, head_dim = q.shape
    lam = np.exp(-np.asarray(decay_rate, np.float64))
    out = np.zeros_like(q)
    final = np.zeros((batch, heads, head_dim, head_dim))
    for b in range(batch):
        for h in range(heads):
            s = np.zeros((head_dim, head_dim)) if initial_state is None else np.asarray(initial_state[b, h], np.float64)
            for t in range(seq):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    s = np.zeros_like(s)
                else:
                    s = lam[h] * s
                s = s + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] = scale * q[b, t, h] @ s
            final[b, h] = s
    return out, final
