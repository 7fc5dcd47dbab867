"""Causal softmax attention (GQA) with packed-sequence, KV-cache and left-padding masks; implementations chosen
through `pallas_kernels.dispatch`.

The plain causal case passes `is_causal=True` so fused kernels use their causal path; packed sequences and cached
decoding add an explicit boolean mask [batch, 1, q_len, kv_len] (causal ∧ same segment, or causal ∧ same side of a
row's left padding). With a cache, every implementation is told that keys past `query_offset + q_len` are empty
(`key_value_seq_lengths`), so a prefill chunk's cost follows the filled part of the cache, not its size.
Implementations: "xla" / "cudnn" (`jax.nn.dot_product_attention`), "tokamax" (tokamax's flash attention, Mosaic
kernels, GPU Hopper / TPU, the `gpu` extra). None tries, per platform: GPU "tokamax" (training-shaped calls, and
cached prefill chunks whose query and cache lengths are multiples of `TOKAMAX_CACHE_BLOCK`) then "xla" (which
also takes single-token decode; on the H200 it beat a multiply-and-reduce form of decode attention, which reads the
cache once, by 1.4-1.7x); TPU and CPU "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import Implementation, Op, at_default_precision, with_package

TOKAMAX_CACHE_BLOCK = 128  # tokamax's Mosaic kernel tiles queries by 2 x 64 and keys by 64
ATTENTION = Op(
    "causal_attention",
    "pallas_kernels.attention",
    {
        "xla": Implementation("xla:attention_xla"),
        "cudnn": Implementation("xla:attention_cudnn", available=with_package("jax", "gpu")),
        "tokamax": Implementation("tokamax_mosaic:attention_tokamax",
                                  available=at_default_precision(with_package("tokamax", "gpu", "tpu"))),
    },
    {"gpu": ("tokamax", "xla"), "tpu": ("xla",), "cpu": ("xla",)},
)


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
    if segment_ids is not None and query_offset is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
    if key_start is not None and query_offset is None:
        raise ValueError("key_start (left padding of a KV cache) needs query_offset")
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    tiled = q_len % TOKAMAX_CACHE_BLOCK == 0 and kv_len % TOKAMAX_CACHE_BLOCK == 0

    def supports(name: str) -> str | None:
        if name == "tokamax" and query_offset is not None and not tiled:
            return f"with a KV cache, query and cache lengths must be multiples of {TOKAMAX_CACHE_BLOCK}"
        return None

    fn = ATTENTION.resolve(implementation, supports)
    mask = filled = None
    if query_offset is not None:
        query_index = (jnp.arange(q_len) + query_offset)[None, :, None]
        key_index = jnp.arange(kv_len)[None, None, :]
        mask = key_index <= query_index
        if key_start is not None:
            start = key_start[:, None, None]
            mask = mask & ((key_index >= start) == (query_index >= start))
        mask = mask[:, None]  # [batch or 1, 1, q_len, kv_len]
        filled = jnp.full((batch,), query_offset + q_len, jnp.int32)  # keys past the chunk are empty
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    # With a cache, the causal part lives in the offset mask.
    return fn(q, k, v, mask=mask, scale=scale, is_causal=query_offset is None, key_value_seq_lengths=filled)
