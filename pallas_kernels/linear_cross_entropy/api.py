"""`linear_cross_entropy(..., implementation=)`: the training loss of the lm_head.

"chunked" (default): tokens in chunks, the gradient formed in the forward pass, no [tokens, vocab] logits kept
(chunked.py). "reference": full fp32 logits and autodiff, for tests and small vocabularies.
"""

from __future__ import annotations

import jax

from pallas_kernels.linear_cross_entropy.chunked import linear_cross_entropy_chunked
from pallas_kernels.linear_cross_entropy.reference import linear_cross_entropy_reference

IMPLEMENTATIONS = ("chunked", "reference")


def linear_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    implementation: str = "chunked",
    chunk_size: int = 4096,
) -> jax.Array:
    """Σ_t weights[t] · (logsumexp(z_t) − z_t[targets[t]]) with z_t = hidden[t] @ kernel, an fp32 scalar.

    hidden [tokens, hidden_size] in the compute dtype; kernel [hidden_size, vocab] (any float dtype: cast to
    hidden's dtype for the products, fp32 accumulation; its gradient comes back in its own dtype);
    targets [tokens] int; weights [tokens] fp32 (e.g. loss mask / token count). Differentiable in hidden, kernel
    and weights.
    """
    if implementation == "chunked":
        return linear_cross_entropy_chunked(hidden, kernel, targets, weights, chunk_size)
    if implementation == "reference":
        return linear_cross_entropy_reference(hidden, kernel, targets, weights)
    raise ValueError(f"unknown linear_cross_entropy implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
