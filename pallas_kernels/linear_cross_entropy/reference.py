"""Plain lm_head + cross-entropy: full fp32 logits, gradients by autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [tokens, vocab] fp32, targets [tokens] int -> [tokens] fp32 logsumexp(logits) − logits[target]."""
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def linear_cross_entropy_reference(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, chunk_size: int | None = None
) -> jax.Array:
    """Σ_t weights[t] · CE(hidden[t] @ kernel, targets[t]) as an fp32 scalar.

    chunk_size is accepted for the op's common signature and ignored: the reference forms every logit at once.

    hidden [tokens, hidden_size] (compute dtype); kernel [hidden_size, vocab] (cast to hidden's dtype, products
    accumulated in fp32); targets [tokens] int; weights [tokens] fp32 (loss mask over the normaliser).
    """
    logits = jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return jnp.sum(token_losses(logits, targets) * weights)
