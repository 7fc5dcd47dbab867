"""Checks of the token ids given to the model API, before they reach the embedding lookup.

Out-of-range ids do not fail inside XLA: the embedding gather fills NaN for an id >= vocab_size (a whole row of
NaN logits, even before the bad token) and -1 silently means the last id. `check_tokens` turns that into a
one-line ValueError for concrete arrays (eager calls such as `model(tokens)` or `from_hf(...)(tokens)`).

Under `jit` the tokens are tracers and only shapes and dtypes are checked (the values are unknown while tracing).
To check traced ids too, return `token_errors` (the same value checks as a `checkify` error) next to the output and
throw it outside:

    @nnx.jit
    def forward(model, tokens):
        return token_errors(tokens, model.config), model(tokens)

    error, logits = forward(model, tokens)
    error.throw()   # checkify.JaxRuntimeError naming the smallest and largest id, or the length
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from ring_jax.config import ModelConfig


def max_sequence_length(config: ModelConfig) -> int:
    """Positions the model accepts: max_position_embeddings, or the longer context `rope_scaling` extends it to.

    With scaling, the context is factor * the original length (`original_max_position_embeddings`; without it,
    'linear' scales max_position_embeddings and 'yarn' takes max_position_embeddings as already extended, as
    `rope_frequencies` does).
    """
    if config.rope_scaling is None:
        return config.max_position_embeddings
    scaling = dict(config.rope_scaling)
    factor = float(scaling["factor"])
    kind = scaling.get("rope_type", scaling.get("type"))
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        original = config.max_position_embeddings if kind == "linear" else config.max_position_embeddings / factor
    return max(config.max_position_embeddings, int(original * factor))


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_tokens(tokens, config: ModelConfig, cache_length=0) -> None:
    """Raises ValueError unless `tokens` is a non-empty integer [batch, seq] array of ids in [0, vocab_size) whose
    last position (cache_length + seq) fits `max_sequence_length(config)`. Shapes and dtypes are always checked,
    values only for concrete arrays (see `token_errors` for traced ones)."""
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"tokens: expected an integer array [batch, seq], got {type(tokens).__name__}")
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"tokens: expected a non-empty [batch, seq] array, got shape {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens: expected integer token ids, got dtype {dtype}")
    vocab, limit = config.vocab_size, max_sequence_length(config)
    if _is_traced(tokens) or _is_traced(cache_length):
        return
    low, high = int(jnp.min(tokens)), int(jnp.max(tokens))
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        where = tuple(int(i) for i in np.argwhere(np.asarray(tokens) == bad)[0])
        raise ValueError(f"tokens: id {bad} at [batch, seq] = {list(where)} is outside [0, vocab_size={vocab})")
    end = int(cache_length) + shape[1]
    if end > limit:
        what = f"{shape[1]} tokens" if not int(cache_length) else f"{int(cache_length)} cached + {shape[1]} tokens"
        raise ValueError(
            f"tokens: {what} exceed the {limit} positions the model accepts "
            f"(max_position_embeddings={config.max_position_embeddings}, rope_scaling="
            f"{None if config.rope_scaling is None else dict(config.rope_scaling)})"
        )


def token_errors(tokens: jax.Array, config: ModelConfig, cache_length=0) -> checkify.Error:
    """The value checks of `check_tokens` as a `checkify.Error` (works on tracers: return it from a jitted function
    and call `.throw()` outside)."""
    vocab, limit, seq = config.vocab_size, max_sequence_length(config), tokens.shape[1]

    def checks(tokens: jax.Array, cache_length: jax.Array) -> None:
        checkify.check(
            jnp.all((tokens >= 0) & (tokens < vocab)),
            f"tokens: ids must be in [0, vocab_size={vocab}); got min {{}} max {{}}",
            jnp.min(tokens),
            jnp.max(tokens),
        )
        checkify.check(
            cache_length + seq <= limit,
            f"tokens: {{}} cached + {seq} tokens exceed the {limit} positions the model accepts",
            cache_length,
        )

    error, _ = checkify.checkify(checks)(tokens, jnp.asarray(cache_length))
    return error
