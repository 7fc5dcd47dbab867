"""Long-context inference speed of the hybrid against its all-softmax variant (same sizes), on one GPU.

    python benchmarks/inference.py [--quick] [--config=configs/ring_mini_linear_2.py] [--config.model.FIELD=...]
        [--prefill_contexts=4096,...,131072] [--decode_contexts=4096,...,65536] [--decode_batch=64]
        [--layouts=hybrid,softmax] [--alignment_tokens=1024] [--compilation_cache=DIR]

Random bf16 weights built on the device (one jitted init; no host copy), one model at a time (freed before the
next). Both go through the generation code users run (`ring_jax.generate.engine`):
- prefill: batch 1, one compiled chunk function (`prefill_chunk`, `--prefill_chunk` tokens) reused for every
  context; the KV cache is sized for the longest context, and the attention of a chunk only reads the filled part
  of it (tokamax's kernel is given the filled length), so a context's cost follows the context, not the cache;
- decode: `decode_block` (a `lax.while_loop` of greedy steps, cache donated) at batch `--decode_batch`, or the
  largest multiple of 8 whose cache and XLA temporaries fit the free memory (XLA's memory analysis of the compiled
  step; the batch is printed); the cache is sized context + the steps run (attention cost follows the cache size)
  and filled with random keys/values/states, so one compile per context (two when the batch must shrink);
- decode-step parts at the same shapes, each jitted alone: an MoE feed-forward, a lightning attention block
  (projections + decode kernel on the fp32 state), a softmax attention block over the KV cache;
- alignment (hybrid, fp32 lightning states): next-token log-probs of the training forward against prefill + decode
  (`ring_jax.alignment`), max and mean absolute difference, in bf16 and in fp32 compute, beside the bf16 training
  forward against the fp32 one (what bf16 rounding alone does to the same weights).
Every case catches its own failure (out of memory included), prints it and goes on; progress is flushed as it
happens, a compact table comes last, and results go to $OUT/inference.json (rewritten after every case).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from benchmarks.profiling import median_ms
from ring_jax.alignment import compare_paths
from ring_jax.config import ModelConfig
from ring_jax.generate.engine import decode_block, prefill_chunk, start_decode, stop_array
from ring_jax.generate.sampling import SamplingParams
from ring_jax.layers.attention import KVCache, LayerInputs
from ring_jax.layers.rope import rope_tables
from ring_jax.model import ModelCache, RingLinearModel, init_model, layer_locations

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ring_mini_linear_2.py", "Model config (its `model`).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 10 layers, short contexts, few steps.")
_LAYOUTS = flags.DEFINE_list("layouts", ["hybrid", "softmax"], "attention_layout values to compare.")
_PREFILL = flags.DEFINE_list("prefill_contexts", ["4096", "8192", "16384", "32768", "65536", "131072"], "Tokens.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 4096, "Prefill chunk (tokens per compiled call).")
_DECODE = flags.DEFINE_list("decode_contexts", ["4096", "8192", "16384", "32768", "65536"], "Cached tokens.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 64, "Decode batch (lowered to what fits).")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 16, "Decode steps per timed block.")
_DECODE_REPS = flags.DEFINE_integer("decode_reps", 3, "Timed blocks per context (median).")
_PARTS = flags.DEFINE_bool("parts", True, "Time the MoE / lightning / attention parts of a decode step.")
_ALIGNMENT_TOKENS = flags.DEFINE_integer("alignment_tokens", 1024, "Tokens of the bf16 alignment check (0: skip).")
_RESERVE_GB = flags.DEFINE_float("reserve_gb", 6.0, "Device memory kept free when sizing the decode batch.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache", "/tmp/ring_jax_compilation_cache", "JAX persistent compilation cache ('' disables)."
)

GREEDY = SamplingParams(0.0, 0, 1.0)
NO_STOPS = stop_array(())
MEMORY_FRACTION = "0.92"  # of the GPU for XLA's allocator (its default 0.75 would cap the decode batch)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_config() -> ModelConfig:
    section = _CONFIG.value.model
    section.update(dtype="bfloat16", param_dtype="bfloat16")
    if _QUICK.value:
        section.update(num_hidden_layers=10)
    return ModelConfig.from_config(section)


def contexts(values: list[str], quick: list[int]) -> list[int]:
    return quick if _QUICK.value else [int(v) for v in values]


def memory() -> dict[str, int] | None:
    """Device memory statistics (None on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else {k: int(stats[k]) for k in ("bytes_limit", "bytes_in_use") if k in stats}


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Results:
    """Nested results, rewritten as $OUT/inference.json after every case (a timeout keeps what finished)."""

    def __init__(self, meta: dict[str, Any]):
        self.data: dict[str, Any] = {"meta": meta}
        out = os.environ.get("OUT")
        self.path = os.path.join(out, "inference.json") if out else None

    def put(self, keys: tuple[str, ...], value: Any) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        if self.path:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=1)


def guarded(results: Results, keys: tuple[str, ...], fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Runs one case; a failure (e.g. out of memory) is printed and recorded, and the benchmark goes on."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001  (any failure of one case must not end the run)
        message = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log(f"FAILED {'/'.join(keys)}: {message}")
        traceback.print_exc(limit=3)
        results.put(keys, {"error": message})
        return None
    results.put(keys, value)
    return value


# ----------------------------------------------------------------------------------------------------------------
# Prefill


def prefill_case(graphdef: Any, state: Any, model: RingLinearModel, context: int, cache_length: int) -> dict:
    chunk = _PREFILL_CHUNK.value
    if context % chunk:
        raise ValueError(f"context {context} is not a multiple of --prefill_chunk {chunk}")
    tokens = jax.random.randint(jax.random.key(context), (1, context), 0, model.config.vocab_size, jnp.int32)
    repeats = max(1, min(3, 32768 // context))
    seconds = []
    for _ in range(repeats):
        cache = model.init_cache(1, cache_length)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        for begin in range(0, context, chunk):
            logits, cache = prefill_chunk(graphdef, state, tokens[:, begin : begin + chunk], cache)
        jax.block_until_ready(logits)
        seconds.append(time.perf_counter() - start)
        del cache
    elapsed = statistics.median(seconds)
    return {"seconds": elapsed, "tokens_per_second": context / elapsed, "chunks": context // chunk}


def run_prefill(results: Results, layout: str, graphdef: Any, state: Any, model: RingLinearModel) -> None:
    prefill_contexts = contexts(_PREFILL.value, [4096, 16384])
    if not prefill_contexts:  # --prefill_contexts= (empty): decode only
        return
    cache_length = max(prefill_contexts)
    chunk = _PREFILL_CHUNK.value

    def warm_up() -> dict[str, float]:
        start = time.perf_counter()
        tokens = jnp.full((1, chunk), 5, jnp.int32)
        jax.block_until_ready(prefill_chunk(graphdef, state, tokens, model.init_cache(1, cache_length))[0])
        return {"seconds": time.perf_counter() - start}

    compiled = guarded(results, (layout, "prefill_compile"), warm_up)
    if compiled is None:
        return
    log(f"{layout}: prefill chunk of {chunk} tokens compiled + run in {compiled['seconds']:.1f} s")
    for context in prefill_contexts:
        value = guarded(
            results,
            (layout, "prefill", str(context)),
            lambda context=context: prefill_case(graphdef, state, model, context, cache_length),
        )
        if value:
            speed = value["tokens_per_second"]
            log(f"{layout}: prefill {context:>6} tokens: {value['seconds']:.3f} s, {speed:,.0f} tok/s")


# ----------------------------------------------------------------------------------------------------------------
# Decode


def cache_bytes_per_sequence(model: RingLinearModel, length: int) -> int:
    shapes = jax.eval_shape(lambda: model.init_cache(1, length))
    return tree_bytes(shapes) - 8  # minus the length / left-padding scalars


def free_bytes() -> float | None:
    """Device bytes XLA may still allocate, minus --reserve_gb (None where the backend does not say)."""
    stats = memory()
    if stats is None or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats["bytes_in_use"] - _RESERVE_GB.value * 2**30


def compile_decode(graphdef: Any, state: Any, model: RingLinearModel, batch: int, length: int, new_tokens: int):
    """decode_block compiled from shapes alone for (batch, cache slots), and the device bytes a call needs besides
    the weights: its donated state (the cache, updated in place) plus XLA's temporaries."""
    cache = jax.eval_shape(lambda: model.init_cache(batch, length))
    logits = jax.ShapeDtypeStruct((batch, model.config.vocab_size), jnp.float32)
    decode = jax.eval_shape(lambda c, x: start_decode(c, x, new_tokens, NO_STOPS), cache, logits)
    lowered = decode_block.lower(graphdef, state, decode, jnp.asarray(NO_STOPS), GREEDY, jax.random.key(0),
                                 block=_DECODE_STEPS.value)  # fmt: skip
    compiled = lowered.compile()
    analysis = compiled.memory_analysis()
    temporaries = analysis.temp_size_in_bytes if analysis is not None else 0
    return compiled, tree_bytes(decode) + temporaries


def fit_decode(graphdef: Any, state: Any, model: RingLinearModel, length: int, new_tokens: int):
    """(compiled decode_block, batch): --decode_batch, or the largest multiple of 8 (or smaller batch) whose cache
    and temporaries fit the free memory, by XLA's own memory analysis of the compiled program."""
    free = free_bytes()
    batch = _DECODE_BATCH.value
    compiled, need = compile_decode(graphdef, state, model, batch, length, new_tokens)
    while free is not None and need > free:
        fits = int(free // (need / batch))  # cache and temporaries grow with the batch
        smaller = fits // 8 * 8 if fits >= 8 else fits
        batch = min(smaller, batch - (8 if batch > 8 else 1))
        if batch < 1:
            raise MemoryError(f"not even one sequence of {length} cache slots fits ({gib(need):.1f} GiB needed)")
        compiled, need = compile_decode(graphdef, state, model, batch, length, new_tokens)
    return compiled, batch


def random_cache(model: RingLinearModel, batch: int, length: int, filled: int) -> ModelCache:
    """A cache of `length` slots holding `filled` tokens of random keys / values / states (built on the device)."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length))

    @jax.jit
    def build() -> ModelCache:
        leaves, treedef = jax.tree.flatten(shapes)
        keys = jax.random.split(jax.random.key(7), len(leaves))

        def fill(key: jax.Array, leaf: jax.ShapeDtypeStruct) -> jax.Array:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):  # the length and left-padding counters
                return jnp.zeros(leaf.shape, leaf.dtype)
            scale = 0.02 if leaf.dtype == jnp.float32 else 1.0  # fp32 leaves: lightning states
            return jax.random.normal(key, leaf.shape, leaf.dtype) * scale

        values = [fill(key, leaf) for key, leaf in zip(keys, leaves, strict=True)]
        cache = jax.tree.unflatten(treedef, values)
        return cache._replace(length=jnp.int32(filled), left_padding=jnp.zeros((batch,), jnp.int32))

    return build()


def decode_case(graphdef: Any, state: Any, model: RingLinearModel, context: int) -> dict:
    steps, reps = _DECODE_STEPS.value, _DECODE_REPS.value
    new_tokens = steps * (reps + 1)
    length = -(-(context + new_tokens) // 128) * 128
    start = time.perf_counter()
    run_block, batch = fit_decode(graphdef, state, model, length, new_tokens)
    compile_seconds = time.perf_counter() - start
    cache = random_cache(model, batch, length, context)
    logits = jax.random.normal(jax.random.key(1), (batch, model.config.vocab_size), jnp.float32)
    decode = start_decode(cache, logits, new_tokens, NO_STOPS)
    args = (jnp.asarray(NO_STOPS), GREEDY, jax.random.key(0))
    decode = jax.block_until_ready(run_block(state, decode, *args))  # the first block: warm-up
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        decode = run_block(state, decode, *args)
        jax.block_until_ready(decode.tokens)
        seconds.append(time.perf_counter() - start)
    if int(decode.step) != new_tokens:
        raise RuntimeError(f"decode ran {int(decode.step)} steps, expected {new_tokens}")
    step_seconds = statistics.median(seconds) / steps
    return {
        "batch": batch,
        "cache_slots": length,
        "step_ms": step_seconds * 1e3,
        "tokens_per_second": batch / step_seconds,
        "compile_s": compile_seconds,
        "cache_bytes_per_sequence": cache_bytes_per_sequence(model, context),
    }


# ----------------------------------------------------------------------------------------------------------------
# Parts of a decode step


def _layer(model: RingLinearModel, softmax: bool) -> tuple[int, Any] | None:
    """(HF index, module) of the first unrolled MoE layer of the given attention kind, or None."""
    config = model.config
    for index, location in enumerate(layer_locations(config)):
        if location[0] == "pre" and config.is_moe_layer(index) and config.is_softmax_layer(index) == softmax:
            return index, model.pre_layers[location[1]]
    return None


def _decode_inputs(config: ModelConfig, batch: int, context: int) -> LayerInputs:
    cos, sin = rope_tables(jnp.full((batch, 1), context, jnp.int32), config)
    return LayerInputs(cos, sin, None, jnp.int32(context), None, jnp.zeros((batch,), jnp.int32))


def _moe_ms(layer: Any, x: jax.Array) -> float:
    graphdef, params = nnx.split(layer)

    @jax.jit
    def moe(params: Any, x: jax.Array) -> jax.Array:
        layer = nnx.merge(graphdef, params, copy=True)
        return layer.mlp(layer.post_attention_norm(x))[0]

    return median_ms(moe, params, x)


def _attention_ms(layer: Any, index: int, x: jax.Array, inputs: LayerInputs, carry: Any) -> float:
    """Median ms of the layer's attention block (norm, projections, attention) on a donated KV cache or lightning
    state, threaded from call to call as in decoding (no copy of the cache per call)."""
    graphdef, params = nnx.split(layer)

    @functools.partial(jax.jit, donate_argnums=0)
    def attend(carry: Any, params: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        layer = nnx.merge(graphdef, params, copy=True)
        normed = layer.input_norm(x)
        if layer.softmax:
            out, carry = layer.attention(normed, inputs, carry)
        else:
            out, carry = layer.attention(normed, inputs, index, carry)
        return carry, out

    carry, out = jax.block_until_ready(attend(carry, params, x))
    samples = []
    for _ in range(10):
        start = time.perf_counter()
        carry, out = jax.block_until_ready(attend(carry, params, x))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def parts_case(model: RingLinearModel, batch: int, context: int) -> dict:
    """ms of one decode step's parts at (batch, context): MoE feed-forward, lightning block, softmax block."""
    config = model.config
    dtype, heads, head_dim = config.compute_dtype, config.num_attention_heads, config.head_dim
    x = jax.random.normal(jax.random.key(3), (batch, 1, config.hidden_size), dtype)
    inputs = _decode_inputs(config, batch, context)
    times: dict[str, float] = {}
    softmax_layer, lightning_layer = _layer(model, softmax=True), _layer(model, softmax=False)
    if softmax_layer is not None:
        times["moe_ms"] = _moe_ms(softmax_layer[1], x)
        shape = (batch, -(-(context + 1) // 128) * 128, config.num_key_value_heads, head_dim)
        kv = KVCache(*(jax.random.normal(jax.random.key(i), shape, dtype) for i in (4, 5)))
        times["attention_ms"] = _attention_ms(softmax_layer[1], softmax_layer[0], x, inputs, kv)
    if lightning_layer is not None:
        lightning_state = jax.random.normal(jax.random.key(6), (batch, heads, head_dim, head_dim), jnp.float32) * 0.02
        times["lightning_ms"] = _attention_ms(lightning_layer[1], lightning_layer[0], x, inputs, lightning_state)
    return times


def run_decode(results: Results, layout: str, graphdef: Any, state: Any, model: RingLinearModel) -> None:
    for context in contexts(_DECODE.value, [4096, 16384]):
        value = guarded(
            results,
            (layout, "decode", str(context)),
            lambda context=context: decode_case(graphdef, state, model, context),
        )
        if value is None:
            continue
        log(
            f"{layout}: decode at {context:>6} cached tokens, batch {value['batch']}: {value['step_ms']:.2f} ms/step, "
            f"{value['tokens_per_second']:,.0f} tok/s (compile {value['compile_s']:.1f} s)"
        )
        if _PARTS.value:
            parts = guarded(
                results,
                (layout, "decode_parts", str(context)),
                lambda context=context, batch=value["batch"]: parts_case(model, batch, context),
            )
            if parts:
                log(f"{layout}: decode parts at {context}: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))


# ----------------------------------------------------------------------------------------------------------------
# Alignment


def alignment_case(config: ModelConfig, tokens: int) -> dict:
    """bf16 training forward vs prefill + decode, and two yardsticks on the same weights and tokens: the same
    comparison in fp32 compute (the paths' own agreement, free of bf16 rounding), and the bf16 training forward
    against the fp32 one (how far bf16 rounding alone moves the training path)."""
    hybrid = config.replace(attention_layout="hybrid")
    ids = jax.random.randint(jax.random.key(2), (1, tokens), 0, config.vocab_size, jnp.int32)
    chunk = min(256, tokens // 2)
    results = {"tokens": tokens - 1}
    # fp32 runs the XLA attention and grouped matmul: tokamax's Mosaic kernels take no fp32 at full precision.
    fp32 = dict(dtype="float32", attention_implementation="xla", gmm_implementation="ragged_dot")
    for name, overrides in (("bf16", {}), ("fp32", fp32)):
        model = init_model(hybrid.replace(**overrides), seed=1)  # same seed, same bf16 weights
        with jax.default_matmul_precision("highest" if overrides else "default"):  # fp32 without TF32
            report = compare_paths(model, ids, prefill_fraction=0.5, chunk=chunk)
        results[name] = {
            "logprob_max_abs_diff": report.max_abs,
            "logprob_mean_abs_diff": report.mean_abs,
            "layer_relative_errors": [float(e) for e in report.layer_errors],
            "final_norm_relative_error": report.hidden_error,
        }
        results[f"{name}_training_logprobs"] = report.training
        del model
        gc.collect()
    rounding = np.abs(results.pop("bf16_training_logprobs") - results.pop("fp32_training_logprobs"))
    results["bf16_vs_fp32_training"] = {"logprob_max_abs_diff": float(rounding.max()),
                                        "logprob_mean_abs_diff": float(rounding.mean())}  # fmt: skip
    return results


# ----------------------------------------------------------------------------------------------------------------
# Table


def summary(data: dict[str, Any]) -> str:
    layouts = [name for name in ("hybrid", "softmax") if name in data]
    lines = []

    def value(layout: str, section: str, context: str, key: str) -> float | None:
        entry = data.get(layout, {}).get(section, {}).get(context, {})
        return entry.get(key) if isinstance(entry, dict) else None

    def ratio(speeds: list[float | None]) -> str:
        return f"{speeds[0] / speeds[1]:.2f}x" if len(speeds) == 2 and all(speeds) else "-"

    def fmt(x: float | None, spec: str = ",.0f") -> str:
        return format(x, spec) if x is not None else "failed"

    prefill = sorted({c for layout in layouts for c in data[layout].get("prefill", {})}, key=int)
    if prefill:
        lines.append("prefill, batch 1: tokens/s")
        lines.append(f"{'context':>8} " + " ".join(f"{name:>10}" for name in layouts) + "  hybrid/softmax")
        for c in prefill:
            speeds = [value(layout, "prefill", c, "tokens_per_second") for layout in layouts]
            lines.append(f"{c:>8} " + " ".join(f"{fmt(s):>10}" for s in speeds) + f"  {ratio(speeds)}")
    decode = sorted({c for layout in layouts for c in data[layout].get("decode", {})}, key=int)
    if decode:
        lines.append("decode: tokens/s (batch) | cache MiB per sequence")
        lines.append(f"{'context':>8} " + " ".join(f"{name:>16}" for name in layouts) + "  hybrid/softmax  " +
                     " ".join(f"{name + ' MiB':>12}" for name in layouts))  # fmt: skip
        for c in decode:
            speeds = [value(layout, "decode", c, "tokens_per_second") for layout in layouts]
            batches = [value(layout, "decode", c, "batch") for layout in layouts]
            sizes = [value(layout, "decode", c, "cache_bytes_per_sequence") for layout in layouts]
            cells = [f"{fmt(s)} ({b})" if s else "failed" for s, b in zip(speeds, batches, strict=True)]
            mib = [fmt(s / 2**20 if s else None, ",.1f") for s in sizes]
            lines.append(f"{c:>8} " + " ".join(f"{x:>16}" for x in cells) + f"  {ratio(speeds):>14}  " +
                         " ".join(f"{m:>12}" for m in mib))  # fmt: skip
        lines.append("decode step parts, ms (MoE / lightning / attention) vs the whole step")
        for layout in layouts:
            for c in decode:
                parts = data[layout].get("decode_parts", {}).get(c, {})
                step = value(layout, "decode", c, "step_ms")
                if parts and "error" not in parts:
                    cells = " ".join(f"{k[:-3]} {v:.3f}" for k, v in parts.items())
                    lines.append(f"  {layout:>7} {c:>6}: {cells}; step {fmt(step, '.2f')}")
    alignment = data.get("alignment")
    if alignment and "error" not in alignment:
        lines.append(f"alignment, {alignment['tokens']} next-token log-probs (fp32 states): max / mean |diff|")
        for key, label in (("bf16", "bf16 training vs decode"), ("fp32", "fp32 training vs decode"),
                           ("bf16_vs_fp32_training", "bf16 vs fp32 training forward")):  # fmt: skip
            entry = alignment[key]
            lines.append(f"  {label:<30} {entry['logprob_max_abs_diff']:.3e} / {entry['logprob_mean_abs_diff']:.3e}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEMORY_FRACTION)  # read when the GPU client starts
    if _CACHE_DIR.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
    config = model_config()
    device = jax.devices()[0]
    meta = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "quick": _QUICK.value,
        "num_hidden_layers": config.num_hidden_layers,
        "num_experts": config.num_experts,
        "prefill_chunk": _PREFILL_CHUNK.value,
        "decode_steps": _DECODE_STEPS.value,
    }
    results = Results(meta)
    log(f"{device.device_kind}: {config.num_hidden_layers} layers, {config.num_experts} experts; memory {memory()}")
    for layout in _LAYOUTS.value:
        start = time.perf_counter()
        variant = config.replace(attention_layout=layout)
        try:
            model = init_model(variant)
            jax.block_until_ready(nnx.state(model))
        except Exception as e:  # noqa: BLE001
            log(f"FAILED to build the {layout} model: {type(e).__name__}: {e}")
            results.put((layout, "build"), {"error": f"{type(e).__name__}: {e}"})
            continue
        graphdef, state = nnx.split(model)
        weights = tree_bytes(state)
        results.put((layout, "build"), {"seconds": time.perf_counter() - start, "weight_bytes": weights})
        log(f"{layout}: {gib(weights):.1f} GiB of weights in {time.perf_counter() - start:.1f} s; memory {memory()}")
        run_prefill(results, layout, graphdef, state, model)
        run_decode(results, layout, graphdef, state, model)
        del model, graphdef, state
        gc.collect()
    if _ALIGNMENT_TOKENS.value:
        log("alignment: hybrid, bf16 and fp32 compute, fp32 lightning states")
        guarded(results, ("alignment",), lambda: alignment_case(config, _ALIGNMENT_TOKENS.value))
    print("\n" + summary(results.data), flush=True)
    if results.path:
        print(f"wrote {results.path}", flush=True)


if __name__ == "__main__":
    app.run(main)
