"""Causal (GQA) softmax attention with packed-sequence and KV-cache masking."""

from pallas_kernels.attention.api import causal_attention

__all__ = ["causal_attention"]
