"""Causal softmax attention (GQA) with packed-sequence and KV-cache masks; implementations chosen through
`pallas_kernels.dispatch`.

The plain causal case passes `is_causal=True` so fused kernels use their causal path; packed sequences and cached
decoding add an explicit boolean mask [batch, 1, q_len, kv_len] (causal ∧ same segment).
Implementations: "xla" / "cudnn" (`jax.nn.dot_product_attention`), "tokamax" (tokamax's flash attention, Mosaic
kernels, GPU Hopper / TPU, the `gpu` extra). None tries, per platform: GPU "tokamax" (training-shaped calls: no KV
cache) then "xla"; TPU and CPU "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import Implementation, Op, with_package

ATTENTION = Op(
    "causal_attention",
    "pallas_kernels.attention",
    {
        "xla": Implementation("xla:attention_xla"),
        "cudnn": Implementation("xla:attention_cudnn", available=with_package("jax", "gpu")),
        "tokamax": Implementation("tokamax_mosaic:attention_tokamax", available=with_package("tokamax", "gpu",
                                                                                            "tpu")),
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

    def supports(name: str) -> str | None:
        return "KV-cache decoding is not supported" if name == "tokamax" and query_offset is not None else None

    fn = ATTENTION.resolve(implementation, supports)
    mask = None
    if query_offset is not None:
        q_len, kv_len = q.shape[1], k.shape[1]
        query_index = jnp.arange(q_len)[:, None] + query_offset
        mask = (jnp.arange(kv_len)[None, :] <= query_index)[None, None]
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return fn(q, k, v, mask=mask, scale=scale, is_causal=query_offset is None)  # with a cache, causality is the mask
