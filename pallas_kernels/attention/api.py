"""Causal softmax attention through `jax.nn.dot_product_attention` (cuDNN on GPU when it accepts the inputs).

The plain causal case passes `is_causal=True` so cuDNN can use its fused causal kernel; packed sequences and cached
decoding build an explicit boolean mask [batch, 1, q_len, kv_len].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    query_offset: jax.Array | int | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Softmax attention; query i (absolute index offset + i) sees keys j <= offset + i of the same segment.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with heads % kv_heads == 0 (GQA);
    segment_ids [batch, q_len] (only without a cache, where q_len == kv_len); query_offset: number of cached tokens
    before q (None: no cache). Returns [batch, q_len, heads, head_dim] in q's dtype.
    """
    if segment_ids is not None and query_offset is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
    if segment_ids is None and query_offset is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
    q_len, kv_len = q.shape[1], k.shape[1]
    offset = 0 if query_offset is None else query_offset
    query_index = jnp.arange(q_len)[:, None] + offset
    mask = (jnp.arange(kv_len)[None, :] <= query_index)[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
