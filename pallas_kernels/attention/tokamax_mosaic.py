"""Softmax attention through tokamax's flash-attention Mosaic kernels (GPU Hopper, TPU), pinned so that an
unsupported case raises instead of silently falling back."""

from __future__ import annotations

import jax


def attention_tokamax(q, k, v, *, mask, scale, is_causal, key_value_seq_lengths) -> jax.Array:
    import tokamax

    return tokamax.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                         key_value_seq_lengths=key_value_seq_lengths,
                                         implementation="mosaic")  # fmt: skip
