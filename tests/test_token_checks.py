"""The model API refuses bad token arrays with one-line errors (eager), skips value checks under jit, and checks
traced tokens through checkify when asked."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify
from support import tiny_config

from ring_jax.model import RingLinearModel
from ring_jax.token_checks import check_tokens, max_sequence_length, token_errors

CONFIG = tiny_config(num_hidden_layers=3, max_position_embeddings=16)
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_ring_linear"


@pytest.fixture(scope="module")
def model():
    return RingLinearModel(CONFIG, rngs=nnx.Rngs(0))


def _tokens(seed: int, batch: int = 2, seq: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=(batch, seq)).astype(np.int32)


@pytest.mark.parametrize(
    "bad, message",
    [
        (CONFIG.vocab_size, r"tokens: id 61 at \[batch, seq\] = \[1, 5\] is outside \[0, vocab_size=61\)"),
        (-1, r"tokens: id -1 at \[batch, seq\] = \[1, 5\] is outside \[0, vocab_size=61\)"),
    ],
)
def test_out_of_range_ids_are_refused_naming_the_position(model, bad, message):
    tokens = _tokens(seed=1)
    tokens[1, 5] = bad
    with pytest.raises(ValueError, match=message):
        model(jnp.asarray(tokens))
    with pytest.raises(ValueError, match=message):
        model.forward(tokens)  # numpy arrays too


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.zeros((2, 4), np.float32) + 1, "tokens: expected integer token ids, got dtype float32"),
        (np.zeros((2, 0), np.int32), r"tokens: expected a non-empty \[batch, seq\] array, got shape \(2, 0\)"),
        (np.ones(5, np.int32), r"tokens: expected a non-empty \[batch, seq\] array, got shape \(5,\)"),
        ([[1, 2]], "tokens: expected an integer array \\[batch, seq\\], got list"),
        (np.ones((1, 17), np.int32), "tokens: 17 tokens exceed the 16 positions the model accepts"),
    ],
)
def test_bad_token_arrays_are_one_line_errors(tokens, message):
    with pytest.raises(ValueError, match=message) as error:
        check_tokens(tokens, CONFIG)
    assert "\n" not in str(error.value)


def test_sequence_length_counts_the_cache_and_rope_scaling():
    check_tokens(np.ones((1, 16), np.int32), CONFIG)
    with pytest.raises(ValueError, match="10 cached \\+ 7 tokens exceed the 16 positions"):
        check_tokens(np.ones((1, 7), np.int32), CONFIG, cache_length=jnp.int32(10))
    linear = CONFIG.replace(rope_scaling=(("factor", 2.0), ("rope_type", "linear")))
    yarn = CONFIG.replace(rope_scaling=(("factor", 4.0), ("original_max_position_embeddings", 8), ("type", "yarn")))
    assert (max_sequence_length(linear), max_sequence_length(yarn)) == (32, 32)
    check_tokens(np.ones((1, 32), np.int32), linear)
    with pytest.raises(ValueError, match="33 tokens exceed the 32 positions"):
        check_tokens(np.ones((1, 33), np.int32), linear)


def test_under_jit_values_are_checked_only_through_token_errors(model):
    tokens = _tokens(seed=2)
    tokens[0, 3] = CONFIG.vocab_size + 4
    forward = nnx.jit(lambda model, tokens: model(tokens))
    logits = forward(model, jnp.asarray(tokens))  # no host sync inside jit: the check is documented as skipped
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()

    @nnx.jit  # the recipe of the token_checks docstring
    def checked(model, tokens):
        return token_errors(tokens, model.config), model(tokens)

    error, _ = checked(model, jnp.asarray(tokens))
    with pytest.raises(checkify.JaxRuntimeError, match=r"ids must be in \[0, vocab_size=61\); got min \d+ max 65"):
        error.throw()
    error, logits = checked(model, jnp.asarray(_tokens(seed=3)))
    error.throw()  # good tokens pass
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(checkify.JaxRuntimeError, match="10 cached \\+ 7 tokens exceed the 16 positions"):
        jax.jit(token_errors, static_argnums=1)(jnp.ones((1, 7), jnp.int32), CONFIG, jnp.int32(10)).throw()


def test_a_converted_checkpoint_refuses_bad_ids_too():
    from ring_jax.convert import from_hf

    model = from_hf(FIXTURE, progress=False)
    tokens = np.load(FIXTURE / "tokens.npy").astype(np.int32)
    tokens[0, -1] = model.config.vocab_size
    with pytest.raises(ValueError, match=f"tokens: id {model.config.vocab_size} at .* is outside"):
        model(jnp.asarray(tokens))
