"""Batched generation: left-padded chunked prefill, then blocks of decode steps in one compiled `lax.while_loop`.

Prompts of different lengths are left-padded to a common length (a multiple of the prefill chunk). The padding
enters no lightning state and no attention (`RingLinearModel.init_cache(left_padding=...)`), so every row computes
what its prompt computes alone. Prefill runs one compiled chunk function per chunk and fills the fp32 lightning
states and the KV caches; decoding then runs up to `decode_block` steps per compiled call (the cache is donated and
updated in place), stopping early when every row has finished. Rows finish on a stop sequence (EOS is one) or after
`max_new_tokens`; between blocks the tokens so far go to an optional callback (streaming).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ring_jax.generate.sampling import SamplingParams, sample_tokens
from ring_jax.model import ModelCache, RingLinearModel

FINISHED = -1  # token slot of a row that had already finished
CACHE_BLOCK = 128  # KV caches are a whole number of attention-kernel blocks
_NEVER = -2  # initial "recent token": matches no stop sequence


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """max_new_tokens: tokens generated per row at most; temperature 0 = greedy; top_k 0 / top_p 1 = no filter;
    seed: the sampling key (same seed, prompts and config -> same tokens); stop_sequences: token-id sequences that end
    a row (include the tokenizer's EOS); max_length: limit on prompt + new tokens per row (default: the model's
    max_position_embeddings); prefill_chunk: prompt tokens per compiled prefill call; decode_block: decode steps per
    compiled call (streamed updates come between blocks)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    max_length: int | None = None
    prefill_chunk: int = 512
    decode_block: int = 16

    def validate(self, vocab_size: int) -> None:
        def fail(field: str, message: str) -> None:
            raise ValueError(f"{field}: {message}")

        for field in ("max_new_tokens", "prefill_chunk", "decode_block"):
            if getattr(self, field) < 1:
                fail(field, f"must be >= 1, got {getattr(self, field)}")
        if not self.temperature >= 0:
            fail("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            fail("top_k", f"must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        for i, stop in enumerate(self.stop_sequences):
            if not stop or not all(0 <= t < vocab_size for t in stop):
                fail("stop_sequences", f"sequence {i} {list(stop)} must be non-empty token ids below {vocab_size}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """tokens: the generated ids (a matched stop sequence included); finish_reason: "stop" or "length"; stop: the
    stop sequence that ended the row (empty for "length")."""

    tokens: np.ndarray
    finish_reason: str
    stop: tuple[int, ...] = ()

    @property
    def content(self) -> np.ndarray:
        """The generated ids without the stop sequence."""
        return self.tokens[: len(self.tokens) - len(self.stop)]


class DecodeState(NamedTuple):
    """What a decode block carries: cache; logits [batch, vocab] fp32 for the next token; tokens [batch,
    max_new_tokens] int32 (FINISHED where a row had ended); step: tokens generated so far; done [batch] bool;
    recent [batch, longest stop] int32, the last generated tokens (for stop matching)."""

    cache: ModelCache
    logits: jax.Array
    tokens: jax.Array
    step: jax.Array
    done: jax.Array
    recent: jax.Array


def _last_logits(model: RingLinearModel, tokens: jax.Array, cache: ModelCache) -> tuple[jax.Array, ModelCache]:
    """Feeds tokens [batch, seq] through the cache; fp32 logits of the last position only (no [seq, vocab])."""
    out = model.forward(tokens, cache=cache, compute_logits=False)
    return model.lm_head(out.hidden_states[:, -1], out_dtype=jnp.float32), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_chunk(graphdef: Any, state: Any, tokens: jax.Array, cache: ModelCache) -> tuple[jax.Array, ModelCache]:
    """One prefill chunk, tokens [batch, chunk], through the donated cache -> (last-position logits, cache)."""
    return _last_logits(nnx.merge(graphdef, state, copy=True), tokens, cache)


def stop_matched(recent: jax.Array, stops: jax.Array) -> jax.Array:
    """recent [batch, L] last tokens, stops [num_stops, L] left-filled with -1 (any token) -> [batch] bool."""
    matches = (recent[:, None, :] == stops[None]) | (stops[None] < 0)
    return jnp.any(jnp.all(matches, axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "block"), donate_argnames=("decode",))
def decode_block(
    graphdef: Any,
    state: Any,
    decode: DecodeState,
    stops: jax.Array,
    sampling: SamplingParams,
    key: jax.Array,
    *,
    block: int,
) -> DecodeState:
    """Up to `block` decode steps on the donated state (fewer when every row is done or the token budget is spent).

    stops: `stop_array(...)`; key: the sampling key (step i samples with fold_in(key, i))."""
    max_new = decode.tokens.shape[1]
    end = jnp.minimum(decode.step + block, max_new)

    def running(s: DecodeState) -> jax.Array:
        return (s.step < end) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        token = sample_tokens(s.logits, jax.random.fold_in(key, s.step), sampling)
        recorded = jnp.where(s.done, FINISHED, token)
        tokens = jax.lax.dynamic_update_slice(s.tokens, recorded[:, None], (0, s.step))
        recent = jnp.concatenate([s.recent[:, 1:], token[:, None]], axis=1)
        done = s.done | stop_matched(recent, stops) | (s.step + 1 >= max_new)
        model = nnx.merge(graphdef, state, copy=True)  # inside the loop body: its forward updates module state
        logits, cache = _last_logits(model, jnp.where(s.done, 0, token)[:, None], s.cache)
        return DecodeState(cache, logits, tokens, s.step + 1, done, recent)

    return jax.lax.while_loop(running, step, decode)


def start_decode(cache: ModelCache, logits: jax.Array, max_new_tokens: int, stops: np.ndarray) -> DecodeState:
    """The decode state after prefill: cache, logits [batch, vocab] of each row's last prompt token."""
    batch = logits.shape[0]
    return DecodeState(
        cache=cache,
        logits=logits,
        tokens=jnp.full((batch, max_new_tokens), FINISHED, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((batch,), bool),
        recent=jnp.full((batch, stops.shape[1]), _NEVER, jnp.int32),
    )


def stop_array(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """[num_stops, longest] int32, each sequence right-aligned and left-filled with -1 (matches any token)."""
    longest = max((len(s) for s in stop_sequences), default=1)
    stops = np.full((len(stop_sequences), longest), -1, np.int32)
    for i, stop in enumerate(stop_sequences):
        stops[i, longest - len(stop) :] = stop
    return stops


def _chunk_size(longest_prompt: int, prefill_chunk: int) -> int:
    """The prefill chunk: the configured size, or the next power of two (>= 8) above a shorter prompt."""
    return min(prefill_chunk, max(8, 1 << (longest_prompt - 1).bit_length()))


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_new: int, max_length: int) -> None:
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i}: empty (a prompt needs at least one token, e.g. BOS)")
        ids = np.asarray(prompt)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt {i}: token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
        if len(prompt) + max_new > max_length:
            raise ValueError(
                f"prompt {i}: {len(prompt)} tokens + max_new_tokens {max_new} = {len(prompt) + max_new} exceeds "
                f"max_length {max_length}"
            )


def _completions(tokens: np.ndarray, done: np.ndarray, stop_sequences: Sequence[Sequence[int]]) -> list[Completion]:
    results = []
    for row, is_done in zip(tokens, done, strict=True):
        generated = row[row != FINISHED]
        stop = next((tuple(s) for s in stop_sequences if tuple(generated[-len(s) :]) == tuple(s)), ())
        results.append(Completion(generated, "stop" if is_done and stop else "length", stop))
    return results


def generate(
    model: RingLinearModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig = GenerationConfig(),
    *,
    on_update: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> list[Completion]:
    """Generates a completion for every prompt (lists of token ids, any lengths) in one batch.

    on_update(tokens [batch, generated so far] int32 with FINISHED after a row's end, done [batch] bool) is called
    after every decode block: the hook for streaming. Compiled functions are cached by shape, so later calls with
    the same batch, prompt bucket and config reuse them.
    """
    model_config = model.config
    config.validate(model_config.vocab_size)
    max_length = config.max_length or model_config.max_position_embeddings
    _check_prompts(prompts, model_config.vocab_size, config.max_new_tokens, max_length)

    batch, longest = len(prompts), max(len(p) for p in prompts)
    chunk = _chunk_size(longest, config.prefill_chunk)
    padded = -(-longest // chunk) * chunk
    left_padding = np.asarray([padded - len(p) for p in prompts], np.int32)
    tokens = np.zeros((batch, padded), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, left_padding[row] :] = prompt

    graphdef, state = nnx.split(model)
    cache_length = -(-(padded + config.max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK
    cache = model.init_cache(batch, cache_length, left_padding=left_padding)
    for start in range(0, padded, chunk):
        logits, cache = prefill_chunk(graphdef, state, jnp.asarray(tokens[:, start : start + chunk]), cache)

    stops = stop_array(config.stop_sequences)
    decode = start_decode(cache, logits, config.max_new_tokens, stops)
    sampling = SamplingParams(jnp.float32(config.temperature), jnp.int32(config.top_k), jnp.float32(config.top_p))
    key = jax.random.key(config.seed)
    while True:
        decode = decode_block(graphdef, state, decode, jnp.asarray(stops), sampling, key, block=config.decode_block)
        step, done = int(decode.step), np.asarray(decode.done)
        if on_update is not None:
            on_update(np.asarray(decode.tokens[:, :step]), done)
        if done.all():
            break
    return _completions(np.asarray(decode.tokens[:, :step]), done, config.stop_sequences)
