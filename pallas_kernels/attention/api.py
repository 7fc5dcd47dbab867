"""Causal softmax attention: `jax.nn.dot_product_attention` (XLA or cuDNN) or tokamax's flash attention.

The plain causal case passes `is_causal=True` so fused kernels use their causal path; packed sequences and cached
decoding add an explicit boolean mask [batch, 1, q_len, kv_len] (causal ∧ same segment, or causal ∧ same side of a
row's left padding).
Implementations: "xla" / "cudnn" (`jax.nn.dot_product_attention`), "tokamax" (`tokamax.dot_product_attention`
pinned to its Mosaic kernels, GPU Hopper / TPU: an unsupported case raises instead of falling back to XLA).
None picks: on GPU with tokamax installed (the `gpu` extra), tokamax's Mosaic kernel for training-shaped calls
(no cache) and for cached prefill chunks whose query and cache lengths are multiples of `TOKAMAX_CACHE_BLOCK`
(falling back to tokamax's XLA version where the kernel declines), XLA otherwise (single-token decode reads the
cache once: XLA's fused matrix-vector products do that well). With a cache, tokamax is told that keys past
`query_offset + q_len` are empty, so a prefill chunk's cost follows the filled part of the cache, not its size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.platform import tokamax_on_gpu

IMPLEMENTATIONS = (None, "xla", "cudnn", "tokamax")
TOKAMAX_CACHE_BLOCK = 128  # tokamax's Mosaic kernel tiles queries by 2 x 64 and keys by 64


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    query_offset: jax.Array | int | None = None,
    key_start: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Softmax attention; query i (absolute index offset + i) sees keys j <= offset + i of the same segment.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with heads % kv_heads == 0 (GQA);
    segment_ids [batch, q_len] (only without a cache, where q_len == kv_len); query_offset: number of cached tokens
    before q (None: no cache); key_start [batch] int (only with a cache): the first key of each row that is not
    left padding. Real queries never see padding keys; padding queries see only padding keys (their output is
    unused, and no row of the mask is empty). Returns [batch, q_len, heads, head_dim] in q's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    if segment_ids is not None and query_offset is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
    if key_start is not None and query_offset is None:
        raise ValueError("key_start (left padding of a KV cache) needs query_offset")
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    mask = None
    if query_offset is not None:
        query_index = (jnp.arange(q_len) + query_offset)[None, :, None]
        key_index = jnp.arange(kv_len)[None, None, :]
        mask = key_index <= query_index
        if key_start is not None:
            start = key_start[:, None, None]
            mask = mask & ((key_index >= start) == (query_index >= start))
        mask = mask[:, None]  # [batch or 1, 1, q_len, kv_len]
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    is_causal = query_offset is None  # with a cache, the causal part lives in the offset mask
    tokamax_choice = "mosaic" if implementation == "tokamax" else None
    tiled = q_len % TOKAMAX_CACHE_BLOCK == 0 and kv_len % TOKAMAX_CACHE_BLOCK == 0
    if implementation is None and tokamax_on_gpu() and (query_offset is None or tiled):
        tokamax_choice = ("mosaic", "xla")
    if tokamax_choice is not None:
        import tokamax

        filled = None
        if query_offset is not None:  # keys past the chunk are empty: the kernel skips their blocks
            filled = jnp.full((batch,), query_offset + q_len, jnp.int32)
        return tokamax.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            scale=scale,
            is_causal=is_causal,
            key_value_seq_lengths=filled,
            implementation=tokamax_choice,
        )
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=is_causal,
        implementation=None if implementation == "xla" else implementation,
    )
