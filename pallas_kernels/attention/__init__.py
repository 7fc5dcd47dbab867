"""Causal (GQA) softmax attention with packed-sequence and KV-cache masking."""

from pallas_kernels.attention.api import ATTENTION, causal_attention

__all__ = ["ATTENTION", "causal_attention"]
