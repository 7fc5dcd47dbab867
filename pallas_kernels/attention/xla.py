"""Softmax attention through `jax.nn.dot_product_attention`: XLA's fused attention or cuDNN's kernel (GPU)."""

from __future__ import annotations

import functools

import jax


def _dot_product_attention(q, k, v, *, mask, scale, is_causal, key_value_seq_lengths, implementation: str):
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=is_causal, key_value_seq_lengths=key_value_seq_lengths,
        implementation=implementation,
    )  # fmt: skip


attention_xla = functools.partial(_dot_product_attention, implementation="xla")
attention_cudnn = functools.partial(_dot_product_attention, implementation="cudnn")
