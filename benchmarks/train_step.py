"""Train-step throughput and model FLOPs utilisation (MFU) of the jitted ring_jax train step, on one device or a
mesh of several (`--config.mesh.data=2`, `fsdp`, `expert`, `tensor`).

    python benchmarks/train_step.py --config=configs/ring_mini_linear_2.py \
        --config.model.num_experts=16 --config.train.batch_size=2 --config.train.seq_len=4096

Model FLOPs per token (training = 3 x forward, forward = 2 x multiply-adds):
    6 * N_active_non_embedding          (every matmul a token passes through: attention projections, dense MLP,
                                         shared expert, top-k routed experts, router; ring_jax.params)
  + 6 * hidden * vocab                  (lm_head)
  + sum over softmax layers  6 * H * D * S        (causal QK^T and PV: 2 * 2 * S * H * D / 2 per token, x3)
  + sum over lightning layers 6 * H * D * (C + 2 * D)  (chunked linear attention: intra-chunk causal
                                         2 * 2 * C * H * D / 2 plus state update and read-out 2 * 2 * H * D^2, x3)
S = seq_len, H = heads, D = head_dim, C = lightning chunk (64). Remat recomputation is not counted (MFU, not HFU).
MFU = tokens/s * FLOPs/token / (devices * peak); peak = 989e12 bf16 dense per H100 / H200 (--peak_tflops).
Batches are random tokens, one document per row. Timing: median of --steps steps after --warmup steps, each step
synchronised with block_until_ready. The step is compiled once ahead of time; with --check_per_shard its compiled
HLO is searched for kernels running on gathered (whole-batch) operands (`ring_jax.train.kernel_check`), and the
benchmark fails if it finds any.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks.profiling import kernel_times, print_kernel_table
from ring_jax.config import ModelConfig
from ring_jax.params import count_parameters
from ring_jax.sharding import make_mesh
from ring_jax.train.kernel_check import gathered_kernel_calls, kernel_calls
from ring_jax.train.optim import make_optimizer
from ring_jax.train.state import StateFactory, validate
from ring_jax.train.step import make_train_step
from ring_jax.train.tuning import tune_kernels
from ring_jax.train.xla_flags import set_default_xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ring_mini_linear_2.py", "Model + training config.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (the first one compiles).")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Peak dense TFLOP/s of the device in the compute dtype.")
_LIGHTNING_CHUNK = flags.DEFINE_integer("lightning_chunk", 64, "Chunk size used in the lightning FLOPs term.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the result as JSON to this file.")
_KERNEL_TUNING_FILE = flags.DEFINE_string("kernel_tuning_file", "", "Load/save tuned kernel configs here.")
_TOP = flags.DEFINE_integer("top", 30, "Kernels listed by --profile.")
_PROFILE = flags.DEFINE_bool("profile", False, "Print the longest device kernels of one step.")
_OVERLAP = flags.DEFINE_bool("overlap_flags", True, "Set ring_jax's XLA options for collective overlap.")
_CHECK = flags.DEFINE_bool("check_per_shard", False, "Fail if a kernel runs on gathered operands (needs > 1 device).")


def flops_per_token(model_config: ModelConfig, seq_len: int, chunk: int) -> dict[str, float]:
    """Training FLOPs per token, by term (see the module docstring)."""
    counts = count_parameters(model_config)
    heads, head_dim = model_config.num_attention_heads, model_config.head_dim
    softmax_layers = sum(model_config.is_softmax_layer(i) for i in range(model_config.num_hidden_layers))
    lightning_layers = model_config.num_hidden_layers - softmax_layers
    terms = {
        "dense_matmuls": 6.0 * counts["activated_non_embedding"],
        "lm_head": 6.0 * model_config.hidden_size * model_config.vocab_size,
        "softmax_attention": 6.0 * heads * head_dim * seq_len * softmax_layers,
        "lightning_attention": 6.0 * heads * head_dim * (chunk + 2 * head_dim) * lightning_layers,
    }
    terms["total"] = sum(terms.values())
    return {**terms, "activated_non_embedding_params": counts["activated_non_embedding"],
            "total_params": counts["total"]}


def check_per_shard(hlo_text: str, batch: int, seq: int, model_config: ModelConfig, mesh) -> None:
    """Exits with an error when a kernel of the compiled step runs on gathered (whole-batch) operands."""
    calls = kernel_calls(hlo_text)
    gathered = gathered_kernel_calls(hlo_text, global_batch=batch, seq_len=seq,
                                     top_k=model_config.num_experts_per_tok,
                                     expert_parallel=mesh.shape["expert"] > 1)  # fmt: skip
    print(f"train_step: {len(calls)} kernel calls in the compiled step, {len(gathered)} on gathered operands",
          flush=True)
    for call in gathered:
        print(f"train_step: GATHERED {call.target} {call.operand_shapes}", flush=True)
    if gathered:
        raise SystemExit("train_step: kernels run on gathered operands (see above)")


def random_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    if _OVERLAP.value:
        set_default_xla_flags()  # kernel libraries log every autotuning-cache lookup at INFO
    config = _CONFIG.value
    model_config = validate(config)
    batch, seq = config.train.batch_size, config.train.seq_len
    tx, _ = make_optimizer(config.optim, max(config.train.steps, config.optim.warmup_steps + 1))
    factory = StateFactory(model_config, tx, make_mesh(config.mesh, use_all=True), seed=0)
    train_step = make_train_step(factory, config)
    rng = np.random.default_rng(0)
    sharding = factory.batch_sharding()
    batches = [jax.device_put(random_batch(rng, batch, seq, model_config.vocab_size), sharding) for _ in range(2)]

    if config.train.autotune_kernels:
        for op in tune_kernels(train_step, factory, config, _KERNEL_TUNING_FILE.value or None):
            timing = f"{op.heuristic_ms:.3f} -> {op.best_ms:.3f} ms" if op.searched else "loaded"
            print(f"train_step: kernel {op.name} {op.shapes}: {timing}", flush=True)
    state = factory.init()
    devices = jax.device_count()
    print(f"train_step: state initialised on {devices} x {jax.devices()[0].device_kind}; compiling", flush=True)
    times = []
    with jax.set_mesh(factory.mesh):
        compile_start = time.perf_counter()
        train_step = train_step.lower(state, batches[0]).compile()
        if _CHECK.value:
            check_per_shard(train_step.as_text(), batch, seq, model_config, factory.mesh)
        for i in range(_WARMUP.value):
            state, metrics = train_step(state, batches[i % 2])
            jax.block_until_ready(metrics)
            if i == 0:
                compile_seconds = time.perf_counter() - compile_start
                print(f"train_step: compile + first step {compile_seconds:.1f} s", flush=True)
        for i in range(_STEPS.value):
            start = time.perf_counter()
            state, metrics = train_step(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            print(f"train_step: step {i} {times[-1] * 1e3:.1f} ms, loss {float(metrics['loss']):.4f}", flush=True)
            if not bool(metrics["finite"]):  # a fast wrong step is no result
                raise SystemExit(f"train_step: step {i} is not finite (loss {float(metrics['loss'])})")

        if _PROFILE.value:
            holder = [state]

            def one_step(batch):
                holder[0], step_metrics = train_step(holder[0], batch)
                return step_metrics

            print_kernel_table("train step", kernel_times(one_step, batches[0]), top=_TOP.value)
            state = holder[0]

    step_seconds = statistics.median(times)
    tokens_per_second = batch * seq / step_seconds
    flops = flops_per_token(model_config, seq, _LIGHTNING_CHUNK.value)
    mfu = tokens_per_second * flops["total"] / (devices * _PEAK.value * 1e12)
    memory = jax.devices()[0].memory_stats() or {}
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": devices,
        "mesh": dict(factory.mesh.shape),
        "jax": jax.__version__,
        "batch": batch,
        "seq_len": seq,
        "dtype": model_config.dtype,
        "param_dtype": model_config.param_dtype,
        "remat_policy": config.model.remat_policy,
        "lightning_implementation": model_config.lightning_implementation,
        "gmm_implementation": model_config.gmm_implementation,
        "attention_implementation": model_config.attention_implementation,
        "fp8": model_config.fp8,
        "autotune_kernels": config.train.autotune_kernels,
        "loss_implementation": config.train.loss_implementation,
        "num_experts": model_config.num_experts,
        "num_hidden_layers": model_config.num_hidden_layers,
        "compile_plus_first_step_s": round(compile_seconds, 1),
        "step_ms_median": round(step_seconds * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "tokens_per_second": round(tokens_per_second, 1),
        "tokens_per_second_per_device": round(tokens_per_second / devices, 1),
        "flops_per_token": flops,
        "model_tflops_per_second": round(tokens_per_second * flops["total"] / 1e12, 1),
        "mfu": round(mfu, 4),
        "loss": float(metrics["loss"]),
        "peak_memory_gib": round(memory.get("peak_bytes_in_use", 0) / 2**30, 2),
    }
    print(json.dumps(result, indent=1), flush=True)
    if _JSON_OUT.value:
        os.makedirs(os.path.dirname(_JSON_OUT.value) or ".", exist_ok=True)
        with open(_JSON_OUT.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
