"""`linear_cross_entropy(..., implementation=)`: the training loss of the lm_head (see `pallas_kernels.dispatch`).

"chunked" (every platform's default): tokens in chunks, the gradient formed in the forward pass, no
[tokens, vocab] logits kept (chunked.py). "reference": full fp32 logits and autodiff, for tests and small
vocabularies.
"""

from __future__ import annotations

import jax

from pallas_kernels.dispatch import Implementation, Op

LINEAR_CROSS_ENTROPY = Op(
    "linear_cross_entropy",
    "pallas_kernels.linear_cross_entropy",
    {
        "chunked": Implementation("chunked:linear_cross_entropy_chunked"),
        "reference": Implementation("reference:linear_cross_entropy_reference"),
    },
    {"gpu": ("chunked",), "tpu": ("chunked",), "cpu": ("chunked",)},
)


def linear_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    implementation: str | None = None,
    chunk_size: int = 4096,
) -> jax.Array:
    """Σ_t weights[t] · (logsumexp(z_t) − z_t[targets[t]]) with z_t = hidden[t] @ kernel, an fp32 scalar.

    hidden [tokens, hidden_size] in the compute dtype; kernel [hidden_size, vocab] (any float dtype: cast to
    hidden's dtype for the products, fp32 accumulation; its gradient comes back in its own dtype);
    targets [tokens] int; weights [tokens] fp32 (e.g. loss mask / token count); chunk_size: tokens per chunk of
    "chunked". Differentiable in hidden, kernel and weights.
    """
    fn = LINEAR_CROSS_ENTROPY.resolve(implementation)
    return fn(hidden, kernel, targets, weights, chunk_size)
