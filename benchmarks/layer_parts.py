"""Time the parts of a training step one by one: where does a step's time go?

    python benchmarks/layer_parts.py --config=configs/ring_mini_linear_2.py --config.model.num_experts=16 \
        --config.model.gmm_implementation=tokamax --config.train.seq_len=4096 --config.train.batch_size=2 \
        [--attention=xla,cudnn,tokamax] [--loss=reference,chunked] [--profile]

For each part, forward and forward+backward (jax.vjp with a random cotangent), bf16 random inputs of the step's
token count, median of 10 timed calls after a compiled warm-up; the compile time is printed too, so a part that
falls off a fast path (dense `ragged_dot`, XLA attention instead of a fused kernel) stands out. Parts: the grouped
matmul alone (N = inter and N = 2·inter), a lightning + MoE layer, a softmax + MoE layer (one per --attention,
with the packing mask), causal attention alone (each --attention, packed and plain; error vs XLA), the lm_head +
loss (each --loss). --profile prints the longest device kernels of every fwd+bwd.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from benchmarks.profiling import kernel_times, median_ms, print_kernel_table
from pallas_kernels.attention import causal_attention
from pallas_kernels.gmm import grouped_matmul
from pallas_kernels.linear_cross_entropy import linear_cross_entropy
from ring_jax.config import ModelConfig
from ring_jax.layers.attention import LayerInputs
from ring_jax.layers.rope import rope_tables
from ring_jax.model import DecoderLayer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ring_mini_linear_2.py", "Model + training config.")
_ATTENTION = flags.DEFINE_list("attention", ["xla"], "Attention implementations to compare (None = 'xla').")
_LOSS = flags.DEFINE_list("loss", ["reference", "chunked"], "lm_head + loss implementations to compare.")
_PROFILE = flags.DEFINE_bool("profile", False, "Print the longest device kernels of every fwd+bwd.")
_PARTS = flags.DEFINE_list("parts", ["gmm", "layers", "attention", "loss"], "Which groups of parts to time.")


def time_call(fn: Callable, *args: Any) -> tuple[float, float]:
    """(compile + first call seconds, median milliseconds per call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, median_ms(fn, *args)


def forward_and_backward(apply: Callable) -> dict[str, Callable]:
    """Jitted forward, and forward+backward with respect to every floating input."""

    def fwd_bwd(*args):
        out, pullback = jax.vjp(apply, *args)
        cotangent = jax.tree.map(lambda o: jnp.ones_like(o) * 1e-3, out)
        return pullback(cotangent)

    return {"fwd": jax.jit(apply), "fwd+bwd": jax.jit(fwd_bwd)}


def layer_part(config: ModelConfig, softmax: bool, tokens: int, seq: int) -> tuple[Callable, tuple]:
    """A decoder layer (MoE feed-forward, packed-sequence segment ids) as a pure function of (its params, x)."""
    layer = DecoderLayer(config, softmax=softmax, moe=True, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    batch = tokens // seq
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    cos, sin = rope_tables(positions, config)
    inputs = LayerInputs(cos, sin, jnp.ones((batch, seq), jnp.int32), 0)

    def apply(params, x):
        return nnx.merge(graphdef, params, rest, copy=True)(x, inputs, 3)[0]

    x = jax.random.normal(jax.random.key(1), (batch, seq, config.hidden_size), config.compute_dtype)
    return apply, (params, x)


def implementation_name(name: str) -> str | None:
    return None if name in ("xla", "None") else name


def build_parts(config, model_config: ModelConfig, rng: np.random.Generator) -> dict[str, tuple[Callable, tuple]]:
    seq, tokens = config.train.seq_len, config.train.batch_size * config.train.seq_len
    dtype, hidden, inter = model_config.compute_dtype, model_config.hidden_size, model_config.moe_intermediate_size
    experts, batch = model_config.num_experts, tokens // seq
    parts: dict[str, tuple[Callable, tuple]] = {}
    if "gmm" in _PARTS.value:
        rows = tokens * model_config.num_experts_per_tok
        group_sizes = jnp.asarray(np.bincount(rng.integers(0, experts, rows), minlength=experts), jnp.int32)
        lhs = jnp.asarray(rng.normal(size=(rows, hidden)), dtype)
        for width in (inter, 2 * inter):
            rhs = jnp.asarray(rng.normal(size=(experts, hidden, width)) * 0.02, dtype)
            parts[f"grouped matmul ({model_config.gmm_implementation}) N={width}"] = (
                lambda lhs, rhs: grouped_matmul(lhs, rhs, group_sizes, implementation=model_config.gmm_implementation),
                (lhs, rhs),
            )
    if "layers" in _PARTS.value:
        parts["lightning + MoE layer"] = layer_part(model_config, False, tokens, seq)
        for name in _ATTENTION.value:
            variant = model_config.replace(attention_implementation=implementation_name(name))
            parts[f"softmax ({name}) + MoE layer"] = layer_part(variant, True, tokens, seq)
    if "attention" in _PARTS.value:
        heads, kv_heads, head_dim = (model_config.num_attention_heads, model_config.num_key_value_heads,
                                     model_config.head_dim)  # fmt: skip
        q = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), dtype)
        k, v = (jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), dtype) for _ in range(2))
        # Two documents per row, split at a random point: the packed mask matters.
        split = rng.integers(seq // 4, 3 * seq // 4)
        segments = jnp.asarray(np.where(np.arange(seq) < split, 1, 2)[None].repeat(batch, 0), jnp.int32)
        for name in _ATTENTION.value:
            impl = implementation_name(name)
            parts[f"attention {name}, packed"] = (
                lambda q, k, v, impl=impl: causal_attention(q, k, v, segment_ids=segments, implementation=impl),
                (q, k, v),
            )
            parts[f"attention {name}, one document"] = (
                lambda q, k, v, impl=impl: causal_attention(q, k, v, implementation=impl), (q, k, v))
    if "loss" in _PARTS.value:
        head = jnp.asarray(rng.normal(size=(hidden, model_config.vocab_size)) * 0.02, jnp.float32)
        targets = jnp.asarray(rng.integers(0, model_config.vocab_size, tokens), jnp.int32)
        weights = jnp.full((tokens,), 1.0 / tokens, jnp.float32)
        x = jnp.asarray(rng.normal(size=(tokens, hidden)), dtype)
        for name in _LOSS.value:
            parts[f"lm_head + loss ({name}, chunk {config.train.loss_chunk_size})"] = (
                lambda x, head, name=name: linear_cross_entropy(
                    x, head, targets, weights, implementation=name, chunk_size=config.train.loss_chunk_size),
                (x, head),
            )
    return parts


def attention_errors(parts: dict[str, tuple[Callable, tuple]]) -> None:
    """Relative error of every attention variant's output against the XLA one of the same masking."""
    for masking in ("packed", "one document"):
        base = parts.get(f"attention xla, {masking}")
        if base is None:
            continue
        expected = np.asarray(jax.jit(base[0])(*base[1]), np.float32)
        for name, (fn, args) in parts.items():
            if name.startswith("attention") and name.endswith(masking) and "xla" not in name:
                try:
                    actual = np.asarray(jax.jit(fn)(*args), np.float32)
                except Exception as error:  # reported in the timing table already
                    print(f"{name}: failed ({type(error).__name__})")
                    continue
                error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
                print(f"{name}: relative error vs xla {error:.2e}", flush=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    model_config = ModelConfig.from_config(config.model)
    tokens = config.train.batch_size * config.train.seq_len
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {tokens} tokens, {model_config.dtype}", flush=True)
    parts = build_parts(config, model_config, np.random.default_rng(0))
    results, profiles = [], []
    for name, (apply, inputs) in parts.items():
        for mode, fn in forward_and_backward(apply).items():
            try:
                compile_s, ms = time_call(fn, *inputs)
            except Exception as error:  # a variant the backend rejects: report it and go on
                print(f"| {name} | {mode} | failed: {type(error).__name__}: {str(error)[:200]} |", flush=True)
                break
            results.append(f"| {name} | {mode} | {compile_s:.1f} | {ms:.3f} |")
            print(results[-1], flush=True)
            if _PROFILE.value and mode == "fwd+bwd":
                profiles.append((f"{name} fwd+bwd", kernel_times(fn, *inputs)))
    attention_errors(parts)
    for title, rows in profiles:
        print_kernel_table(title, rows)
    print("\n| part | mode | compile + first call s | ms |\n|---|---|---|---|")
    print("\n".join(results))


if __name__ == "__main__":
    app.run(main)
