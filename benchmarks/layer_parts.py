"""Time the parts of a training step one by one: where does a step's time go?

    python benchmarks/layer_parts.py --config=configs/ring_mini_linear_2.py --config.model.num_experts=16 \
        --config.model.gmm_implementation=tokamax --config.train.seq_len=4096 --config.train.batch_size=2

For each part, forward and forward+backward (jax.vjp with a random cotangent), bf16 random inputs of the step's
token count, median of 10 timed calls after a compiled warm-up; the compile time is printed too, so a part that
falls off a fast path (dense `ragged_dot`, XLA attention instead of cuDNN) stands out. Parts: the grouped matmul
alone, the MoE block, a lightning layer, a softmax layer (with and without a packing mask), the lm_head + loss.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from flax import nnx
from ml_collections import config_flags

from pallas_kernels.gmm import grouped_matmul
from ring_jax.config import ModelConfig
from ring_jax.layers.attention import LayerInputs
from ring_jax.layers.rope import rope_tables
from ring_jax.model import DecoderLayer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ring_mini_linear_2.py", "Model + training config.")


def time_call(fn: Callable, *args: Any, reps: int = 10) -> tuple[float, float]:
    """(compile + first call seconds, median milliseconds per call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return compile_s, statistics.median(samples)


def forward_and_backward(apply: Callable, *inputs: jax.Array) -> dict[str, Callable]:
    """Jitted forward, and forward+backward with respect to every input."""

    def fwd_bwd(*args):
        out, pullback = jax.vjp(apply, *args)
        cotangent = jax.tree.map(lambda o: jnp.ones_like(o) * 1e-3, out)
        return pullback(cotangent)

    return {"fwd": jax.jit(apply), "fwd+bwd": jax.jit(fwd_bwd)}


def layer_part(config: ModelConfig, softmax: bool, tokens: int, seq: int, packed: bool) -> tuple[Callable, tuple]:
    """A decoder layer as a pure function of (its params, x)."""
    layer = DecoderLayer(config, softmax=softmax, moe=True, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    batch = tokens // seq
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    cos, sin = rope_tables(positions, config)
    segments = jnp.ones((batch, seq), jnp.int32) if packed else None
    inputs = LayerInputs(cos, sin, segments, 0)

    def apply(params, x):
        return nnx.merge(graphdef, params, rest, copy=True)(x, inputs, 3)[0]

    x = jax.random.normal(jax.random.key(1), (batch, seq, config.hidden_size), config.compute_dtype)
    return apply, (params, x)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    model_config = ModelConfig.from_config(config.model)
    seq, tokens = config.train.seq_len, config.train.batch_size * config.train.seq_len
    dtype, hidden = model_config.compute_dtype, model_config.hidden_size
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {tokens} tokens, {model_config.dtype}", flush=True)

    rows = tokens * model_config.num_experts_per_tok
    group_sizes = jnp.asarray(np.bincount(rng.integers(0, model_config.num_experts, rows),
                                          minlength=model_config.num_experts), jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(rows, hidden)), dtype)
    rhs = jnp.asarray(rng.normal(size=(model_config.num_experts, hidden, model_config.moe_intermediate_size)), dtype)
    parts: dict[str, tuple[Callable, tuple]] = {
        f"grouped matmul ({model_config.gmm_implementation})": (
            lambda lhs, rhs: grouped_matmul(lhs, rhs, group_sizes, implementation=model_config.gmm_implementation),
            (lhs, rhs),
        ),
        "lightning + MoE layer": layer_part(model_config, False, tokens, seq, packed=False),
        "softmax + MoE layer": layer_part(model_config, True, tokens, seq, packed=False),
        "softmax + MoE layer, packed (mask)": layer_part(model_config, True, tokens, seq, packed=True),
    }
    head = jnp.asarray(rng.normal(size=(hidden, model_config.vocab_size)) * 0.02, dtype)
    targets = jnp.asarray(rng.integers(0, model_config.vocab_size, tokens), jnp.int32)

    def lm_head_loss(x, head):
        logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=-1))

    parts["lm_head + cross-entropy"] = (lm_head_loss, (jnp.asarray(rng.normal(size=(tokens, hidden)), dtype), head))

    print("\n| part | mode | compile + first call s | ms |\n|---|---|---|---|")
    for name, (apply, inputs) in parts.items():
        for mode, fn in forward_and_backward(apply, *inputs).items():
            compile_s, ms = time_call(fn, *inputs)
            print(f"| {name} | {mode} | {compile_s:.1f} | {ms:.3f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
