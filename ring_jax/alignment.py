"""Training–inference alignment: the training forward against prefill + token-by-token decode of the same tokens.

RL with rollouts from the inference path needs both paths to give the same log-probabilities. This module runs a
sequence through `forward(tokens)` (the training path: chunked lightning kernel, causal attention without a cache)
and through the hybrid cache (chunked prefill, then one token at a time: the lightning decode step on the fp32
state, attention over the KV cache), and compares the log-probability of every next token and the residual stream
after every layer (where a drift starts is where a module differs).

    python -m ring_jax.alignment --config=configs/default.py [--config.model.dtype=bfloat16] [--seq_len=256]
    python -m ring_jax.alignment --hf=Ring-mini-linear-2.0/ --dtype=bfloat16

prints the per-layer relative error table and the max / mean absolute log-probability difference; with `$OUT` set
(or --json=PATH) it also writes them as JSON.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ring_jax.generate.engine import CACHE_BLOCK
from ring_jax.model import ModelCache, RingLinearModel


class PathOutputs(NamedTuple):
    """logits [batch, seq, vocab] fp32; layer_states: per decoder layer, [batch, seq, hidden] residual stream;
    hidden [batch, seq, hidden]: the final-norm output (the lm_head input)."""

    logits: jax.Array
    layer_states: tuple[jax.Array, ...]
    hidden: jax.Array


class AlignmentReport(NamedTuple):
    """training / inference next-token log-probabilities [batch, seq - 1] fp32; compared [batch, seq - 1] bool:
    positions whose next token is in the same document (the others are 0 in both); layer_errors [num_layers]:
    ‖h_inference − h_training‖ / ‖h_training‖ of the residual stream after each layer; hidden_error: the same for
    the final-norm output."""

    training: np.ndarray
    inference: np.ndarray
    compared: np.ndarray
    layer_errors: np.ndarray
    hidden_error: float

    @property
    def differences(self) -> np.ndarray:
        return np.abs(self.training - self.inference)[self.compared]

    @property
    def max_abs(self) -> float:
        return float(np.max(self.differences))

    @property
    def mean_abs(self) -> float:
        return float(np.mean(self.differences))


def next_token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [batch, seq, vocab], tokens [batch, seq] -> [batch, seq - 1] log p(tokens[t + 1] | tokens[:t + 1])."""
    logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _training_pass(graphdef: Any, state: Any, tokens: jax.Array, segment_ids: jax.Array | None) -> PathOutputs:
    out = nnx.merge(graphdef, state, copy=True).forward(tokens, segment_ids=segment_ids, output_layer_states=True)
    return PathOutputs(out.logits, out.layer_states, out.hidden_states)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill_chunk(graphdef: Any, state: Any, tokens: jax.Array, cache: ModelCache) -> tuple[PathOutputs, ModelCache]:
    out = nnx.merge(graphdef, state, copy=True).forward(tokens, cache=cache, output_layer_states=True)
    return PathOutputs(out.logits, out.layer_states, out.hidden_states), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_steps(graphdef: Any, state: Any, tokens: jax.Array, cache: ModelCache) -> PathOutputs:
    """Feeds tokens [batch, n] one at a time (teacher forcing) in a scan; outputs stacked back to [batch, n, ...]."""

    def step(cache: ModelCache, token: jax.Array) -> tuple[ModelCache, PathOutputs]:
        out = nnx.merge(graphdef, state, copy=True).forward(token[:, None], cache=cache, output_layer_states=True)
        return out.cache, PathOutputs(out.logits, out.layer_states, out.hidden_states)

    _, outputs = jax.lax.scan(step, cache, tokens.T)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1)[:, :, 0], outputs)  # [n, batch, 1, ...] -> [batch, n, ...]


def inference_pass(model: RingLinearModel, tokens: jax.Array, prefill_length: int, chunk: int) -> PathOutputs:
    """tokens [batch, seq]: the first `prefill_length` through the cache in chunks of `chunk`, the rest decoded one
    at a time; outputs of every position, as the training forward gives them."""
    batch, seq = tokens.shape
    if not 0 < prefill_length < seq or chunk < 1:
        raise ValueError(f"prefill_length must be in [1, {seq - 1}] and chunk >= 1, got {prefill_length}, {chunk}")
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, -(-seq // CACHE_BLOCK) * CACHE_BLOCK)
    parts = []
    for start in range(0, prefill_length, chunk):
        out, cache = _prefill_chunk(graphdef, state, tokens[:, start : min(start + chunk, prefill_length)], cache)
        parts.append(out)
    parts.append(_decode_steps(graphdef, state, tokens[:, prefill_length:], cache))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def document_spans(segment_ids: np.ndarray) -> list[tuple[int, int]]:
    """[seq] ids -> (start, end) of each run of equal non-zero ids (segment 0 is padding)."""
    starts = [0] + [i for i in range(1, len(segment_ids)) if segment_ids[i] != segment_ids[i - 1]]
    ends = starts[1:] + [len(segment_ids)]
    return [(s, e) for s, e in zip(starts, ends, strict=True) if segment_ids[s] != 0]


def compare_paths(
    model: RingLinearModel,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    prefill_fraction: float = 0.5,
    chunk: int = 64,
) -> AlignmentReport:
    """Runs both paths on tokens [batch, seq]. Packed rows (segment_ids [batch, seq]; 0 = padding) run as one
    packed training forward, and each document through a fresh cache on its own (the state never crosses a document
    boundary in either path). Each sequence prefills `prefill_fraction` of its tokens in chunks of `chunk`."""
    tokens_np = np.asarray(tokens)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens, jnp.int32)
        packed = None
    else:
        packed = segment_ids
    graphdef, state = nnx.split(model)
    train = jax.tree.map(np.asarray, _training_pass(graphdef, state, tokens, packed))
    segments = np.asarray(segment_ids)
    train_logprobs = np.asarray(next_token_logprobs(train.logits, tokens))
    infer_logprobs = np.zeros_like(train_logprobs)
    same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    spans = [(row, start, end) for row in range(len(tokens_np)) for start, end in document_spans(segments[row])]
    expected = {name: [] for name in ("layers", "hidden")}
    actual = {name: [] for name in ("layers", "hidden")}
    for row, start, end in spans:
        if end - start < 2:
            continue
        document = jnp.asarray(tokens_np[row : row + 1, start:end])
        prefill = min(max(1, int((end - start) * prefill_fraction)), end - start - 1)
        infer = jax.tree.map(np.asarray, inference_pass(model, document, prefill, chunk))
        infer_logprobs[row, start : end - 1] = np.asarray(next_token_logprobs(infer.logits, document))[0]
        expected["layers"].append(np.stack([h[row, start:end] for h in train.layer_states]))
        actual["layers"].append(np.stack([h[0] for h in infer.layer_states]))
        expected["hidden"].append(train.hidden[row, start:end])
        actual["hidden"].append(infer.hidden[0])
    train_logprobs = np.where(same_document, train_logprobs, 0.0)
    infer_logprobs = np.where(same_document, infer_logprobs, 0.0)
    layers_expected = np.concatenate(expected["layers"], axis=1)  # [layers, tokens, hidden]
    layers_actual = np.concatenate(actual["layers"], axis=1)
    layer_errors = np.asarray(
        [_relative_error(a, e) for a, e in zip(layers_actual, layers_expected, strict=True)], np.float64
    )
    hidden_error = _relative_error(np.concatenate(actual["hidden"]), np.concatenate(expected["hidden"]))
    return AlignmentReport(train_logprobs, infer_logprobs, same_document, layer_errors, hidden_error)


def format_report(report: AlignmentReport, model: RingLinearModel) -> str:
    """The per-layer table (layer, attention / MLP kind, relative error) and the log-probability differences."""
    config = model.config
    lines = [f"{'layer':>5}  {'attention':<9}  {'mlp':<5}  {'rel. error of h':>15}"]
    for layer, error in enumerate(report.layer_errors):
        attention = "softmax" if config.is_softmax_layer(layer) else "lightning"
        mlp = "moe" if config.is_moe_layer(layer) else "dense"
        lines.append(f"{layer:>5}  {attention:<9}  {mlp:<5}  {error:>15.3e}")
    lines.append(f"{'final norm (lm_head input)':<24}  {report.hidden_error:>15.3e}")
    lines.append(
        f"next-token log-prob |training - inference|: max {report.max_abs:.3e}, mean {report.mean_abs:.3e} "
        f"over {report.differences.size} tokens"
    )
    return "\n".join(lines)


def report_dict(report: AlignmentReport, model: RingLinearModel) -> dict[str, Any]:
    config = model.config
    return {
        "dtype": config.dtype,
        "param_dtype": config.param_dtype,
        "attention_layout": config.attention_layout,
        "num_hidden_layers": config.num_hidden_layers,
        "logprob_max_abs_diff": report.max_abs,
        "logprob_mean_abs_diff": report.mean_abs,
        "tokens": int(report.differences.size),
        "layer_relative_errors": [float(e) for e in report.layer_errors],
        "final_norm_relative_error": report.hidden_error,
        "platform": jax.default_backend(),
    }


def main() -> None:
    # Flags are defined here, not at import, so that importing this module defines no absl flags.
    from absl import app, flags
    from ml_collections import config_flags

    from ring_jax.config import SUPPORTED_DTYPES, ModelConfig
    from ring_jax.model import init_model

    config_flag = config_flags.DEFINE_config_file("config", None, "Model config file (random weights).")
    hf_flag = flags.DEFINE_string("hf", None, "An HF Ring-linear checkpoint directory (instead of --config).")
    dtype_flag = flags.DEFINE_enum("dtype", None, list(SUPPORTED_DTYPES), "--hf: weight and compute dtype.")
    seq_flag = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
    batch_flag = flags.DEFINE_integer("batch", 1, "Sequences.")
    prefill_flag = flags.DEFINE_float("prefill_fraction", 0.5, "Share of each sequence prefilled (rest decoded).")
    chunk_flag = flags.DEFINE_integer("chunk", 64, "Prefill chunk (tokens).")
    seed_flag = flags.DEFINE_integer("seed", 0, "Seed of the random tokens (and of the random weights).")
    json_flag = flags.DEFINE_string("json", None, "Write the report here (default: $OUT/alignment.json if set).")

    def run(argv: list[str]) -> None:
        del argv
        if (config_flag.value is None) == (hf_flag.value is None):
            raise app.UsageError("give exactly one of --config (random weights) and --hf (a checkpoint)")
        if hf_flag.value is not None:
            from ring_jax.convert import from_hf

            model = from_hf(hf_flag.value, dtype=dtype_flag.value, progress=False)
        else:
            model = init_model(ModelConfig.from_config(config_flag.value.model), seed=seed_flag.value)
        rng = np.random.default_rng(seed_flag.value)
        tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch_flag.value, seq_flag.value)), jnp.int32)
        report = compare_paths(model, tokens, prefill_fraction=prefill_flag.value, chunk=chunk_flag.value)
        print(format_report(report, model), flush=True)
        path = json_flag.value or (os.path.join(os.environ["OUT"], "alignment.json") if os.environ.get("OUT") else None)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(report_dict(report, model), f, indent=2)
            print(f"wrote {path}")

    app.run(run)


if __name__ == "__main__":
    main()
