"""Causal softmax attention: `jax.nn.dot_product_attention` (XLA or cuDNN) or tokamax's flash attention.

The plain causal case passes `is_causal=True` so fused kernels use their causal path; packed sequences and cached
decoding add an explicit boolean mask [batch, 1, q_len, kv_len] (causal ∧ same segment).
Implementations: "xla" / "cudnn" (`jax.nn.dot_product_attention`), "tokamax" (`tokamax.dot_product_attention`
pinned to its Mosaic kernels, GPU Hopper / TPU: an unsupported case raises instead of falling back to XLA).
None picks: on GPU with tokamax installed (the `gpu` extra), tokamax's Mosaic kernel for training-shaped calls
(no cache; falling back to tokamax's XLA version where the kernel declines), XLA otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.platform import tokamax_on_gpu

IMPLEMENTATIONS = (None, "xla", "cudnn", "tokamax")


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
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    if segment_ids is not None and query_offset is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
    mask = None
    if query_offset is not None:
        q_len, kv_len = q.shape[1], k.shape[1]
        query_index = jnp.arange(q_len)[:, None] + query_offset
        mask = (jnp.arange(kv_len)[None, :] <= query_index)[None, None]
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    is_causal = query_offset is None  # with a cache, the causal part lives in the offset mask
    tokamax_choice = "mosaic" if implementation == "tokamax" else None
    if implementation is None and query_offset is None and tokamax_on_gpu():
        tokamax_choice = ("mosaic", "xla")
    if tokamax_choice is not None:
        import tokamax

        return tokamax.dot_product_attention(
            q, k, v, mask=mask, scale=scale, is_causal=is_causal, implementation=tokamax_choice
        )
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=is_causal,
        implementation=None if implementation == "xla" else implementation,
    )

