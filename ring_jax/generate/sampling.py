"""Next-token choice from fp32 logits: greedy, or temperature sampling restricted by top-k and top-p.

The knobs are traced values (changing them does not recompile); one descending sort serves both filters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """temperature: 0 = greedy (argmax); top_k: keep the k most likely tokens (0 = all); top_p: keep the smallest
    set of most likely tokens whose probability reaches top_p (1 = all). Scalars, traced under jit."""

    temperature: jax.Array | float = 0.0
    top_k: jax.Array | int = 0
    top_p: jax.Array | float = 1.0


def allowed_tokens(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """[batch, vocab] fp32 -> [batch, vocab] bool: the tokens top-k and top-p leave to sample from (never empty:
    the most likely token always stays)."""
    vocab = logits.shape[-1]
    temperature = jnp.maximum(jnp.asarray(params.temperature, jnp.float32), 1e-6)
    order = jnp.argsort(-logits, axis=-1, stable=True)
    ranked = jnp.take_along_axis(logits, order, axis=-1) / temperature
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    rank = jnp.arange(vocab)
    top_k = jnp.asarray(params.top_k, jnp.int32)
    keep = (rank < jnp.where(top_k > 0, top_k, vocab)) & (mass_before < params.top_p)
    keep = keep.at[:, 0].set(True)
    return jnp.zeros_like(keep).at[jnp.arange(logits.shape[0])[:, None], order].set(keep)


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """[batch, vocab] fp32 logits -> [batch] int32 next tokens (argmax when temperature is 0)."""
    temperature = jnp.asarray(params.temperature, jnp.float32)

    def greedy() -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:  # the vocabulary sort runs only here: greedy decoding does not pay for it
        filtered = jnp.where(allowed_tokens(logits, params), logits / jnp.maximum(temperature, 1e-6), -jnp.inf)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy)
