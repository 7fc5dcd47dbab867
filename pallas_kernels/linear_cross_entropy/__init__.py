"""lm_head + cross-entropy fused: the loss without the [tokens, vocab] logits in memory."""

from pallas_kernels.linear_cross_entropy.api import LINEAR_CROSS_ENTROPY, linear_cross_entropy
from pallas_kernels.linear_cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["LINEAR_CROSS_ENTROPY", "linear_cross_entropy", "linear_cross_entropy_reference"]
