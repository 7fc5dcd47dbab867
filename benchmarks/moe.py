"""One Ring-mini MoE layer (256 experts, top-8, width 512, hidden 2048, shared expert): grouped matmul vs a dense
matmul of equal FLOPs on one GPU, and the same layer expert-parallel over 2 GPUs with each token transport.

    python benchmarks/moe.py [--tokens 16384] [--tune] [--json_out moe.json]

Part 1 (GPU 0): routing given directly (uniform: 8 distinct random experts per token; Zipf(1.2) over experts),
times the expert grouped matmuls alone (`expert_mlp`: gate‖up then down, 6·rows·hidden·inter FLOPs forward,
3x that forward+backward) and the whole routed path (sort, permute, grouped matmuls, weighted combine), forward and
forward+backward, next to one dense matmul with the same FLOPs ([rows, hidden] x [hidden, 3·inter]), timed in the
same process. `--tune` first searches tokamax's grouped-matmul configs for these shapes (as training does).
Part 2 (all visible GPUs when there are 2 or more, mesh expert=N): the MoE layer with every transport of
`ring_jax.layers.moe.parallel`, forward and forward+backward, per-GPU tokens = --tokens; plus the bandwidth of one
all-to-all and of one all-reduce (bus bandwidth 2(n−1)/n · bytes / time) measured in the same run.
Times: median of --reps synchronised calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.profiling import median_ms
from pallas_kernels.gmm.tuning import tune_grouped_matmuls
from ring_jax.config import ModelConfig
from ring_jax.layers.moe import MoE
from ring_jax.layers.moe.dispatch import dispatch_combine, expert_mlp, fuse_gate_up, sort_by_expert
from ring_jax.sharding import make_mesh

PEAK_TFLOPS = 989.0


def routing(rng: np.random.Generator, tokens: int, experts: int, top_k: int, zipf: float | None):
    """experts [tokens, top_k] distinct per token (uniform, or Zipf-skewed popularity), weights [tokens, top_k]."""
    if zipf is None:
        choice = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]
    else:
        popularity = 1.0 / np.arange(1, experts + 1) ** zipf
        keys = np.log(rng.random((tokens, experts))) / popularity  # Efraimidis–Spirakis weighted sampling
        choice = np.argsort(-keys, axis=1)[:, :top_k]
    weights = rng.random((tokens, top_k)).astype(np.float32)
    return jnp.asarray(choice, jnp.int32), jnp.asarray(weights / weights.sum(1, keepdims=True) * 2.5)


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def part_one(config: ModelConfig, tokens: int, reps: int, tune: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    hidden, inter, top_k, experts = (config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok,
                                     config.num_experts)  # fmt: skip
    rows = tokens * top_k
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (tokens, hidden), jnp.bfloat16)
    gate, up = (jax.random.normal(k, (experts, hidden, inter), jnp.bfloat16) * 0.02 for k in keys[1:3])
    down = jax.random.normal(keys[3], (experts, inter, hidden), jnp.bfloat16) * 0.02
    gate_up = fuse_gate_up(gate, up, jnp.bfloat16)
    gmm_flops = 6.0 * rows * hidden * inter
    dense_a = jax.random.normal(keys[0], (rows, hidden), jnp.bfloat16)
    dense_b = jax.random.normal(keys[1], (hidden, 3 * inter), jnp.bfloat16) * 0.02

    dense_fwd = jax.jit(lambda a, b: a @ b)
    dense_bwd = jax.jit(jax.grad(lambda a, b: jnp.sum((a @ b).astype(jnp.float32)), argnums=(0, 1)))
    dense = {"fwd": median_ms(dense_fwd, dense_a, dense_b, reps=reps),
             "fwd+bwd": median_ms(lambda a, b: (dense_fwd(a, b), dense_bwd(a, b)), dense_a, dense_b, reps=reps)}
    results = []
    for name, zipf in (("uniform", None), ("zipf1.2", 1.2)):
        chosen, weights = routing(rng, tokens, experts, top_k, zipf)
        sort = sort_by_expert(chosen, experts)
        sorted_x = x[sort.order // top_k]

        def gmm_loss(sorted_x, gate_up, down, sizes=sort.group_sizes):
            return jnp.sum(expert_mlp(sorted_x, sizes, gate_up, down).astype(jnp.float32))

        def routed_loss(x, gate_up, down, chosen=chosen, weights=weights):
            return jnp.sum(dispatch_combine(x, chosen, weights, gate_up, down).astype(jnp.float32))

        gmm_fwd = jax.jit(lambda a, g, d, sizes=sort.group_sizes: expert_mlp(a, sizes, g, d))
        gmm_bwd = jax.jit(jax.value_and_grad(gmm_loss, argnums=(0, 1, 2)))
        routed_fwd = jax.jit(lambda a, g, d, c=chosen, w=weights: dispatch_combine(a, c, w, g, d))
        routed_bwd = jax.jit(jax.value_and_grad(routed_loss, argnums=(0, 1, 2)))
        if tune:
            for fn, args in ((gmm_fwd, (sorted_x, gate_up, down)), (gmm_bwd, (sorted_x, gate_up, down))):
                tuned = tune_grouped_matmuls(fn.lower(*args))
                print(f"moe: tuned {len(tuned)} grouped-matmul kernels ({name})", flush=True)
        row = {"routing": name, "tokens": tokens, "rows": rows,
               "max_expert_rows": int(sort.group_sizes.max()), "dense_fwd_ms": dense["fwd"],
               "dense_fwdbwd_ms": dense["fwd+bwd"]}  # fmt: skip
        row["gmm_fwd_ms"] = median_ms(gmm_fwd, sorted_x, gate_up, down, reps=reps)
        row["gmm_fwdbwd_ms"] = median_ms(gmm_bwd, sorted_x, gate_up, down, reps=reps)
        row["routed_fwd_ms"] = median_ms(routed_fwd, x, gate_up, down, reps=reps)
        row["routed_fwdbwd_ms"] = median_ms(routed_bwd, x, gate_up, down, reps=reps)
        for mode, factor in (("fwd", 1.0), ("fwdbwd", 3.0)):
            row[f"gmm_{mode}_tflops"] = tflops(factor * gmm_flops, row[f"gmm_{mode}_ms"])
            row[f"dense_{mode}_tflops"] = tflops(factor * gmm_flops, row[f"dense_{mode}_ms"])
            row[f"gmm_{mode}_vs_dense"] = row[f"dense_{mode}_ms"] / row[f"gmm_{mode}_ms"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def part_two(config: ModelConfig, tokens: int, reps: int) -> dict:
    devices = jax.devices()
    mesh = make_mesh({"expert": len(devices)}, use_all=True)
    x = jax.random.normal(jax.random.key(1), (len(devices), tokens, config.hidden_size), jnp.bfloat16)
    out = {"devices": len(devices), "tokens_per_gpu": tokens, "transports": {}}
    reference = None
    with jax.set_mesh(mesh):
        for transport in ("all_gather", "all_to_all", "ragged_all_to_all"):
            graphdef, state = nnx.split(MoE(config.replace(expert_parallel_transport=transport), rngs=nnx.Rngs(0)))

            def forward(state, x, graphdef=graphdef):
                return nnx.merge(graphdef, state)(x)[0]

            fwd = jax.jit(forward)
            bwd = jax.jit(jax.value_and_grad(lambda s, x, f=forward: jnp.sum(f(s, x).astype(jnp.float32)), (0, 1)))
            try:
                out["transports"][transport] = times = {"fwd_ms": median_ms(fwd, state, x, reps=reps),
                                                        "fwdbwd_ms": median_ms(bwd, state, x, reps=reps)}
                y, (_, (grad_state, grad_x)) = jax.device_get((fwd(state, x), bwd(state, x)))
                if reference is None:  # the first transport's results: the others must agree with them
                    reference = (y, grad_state, grad_x)
                else:
                    times["rel_err_out"] = rel_err(y, reference[0])
                    times["rel_err_grad_x"] = rel_err(grad_x, reference[2])
                    times["rel_err_grad_experts"] = rel_err(grad_state["experts"]["down"].get_value(),
                                                            reference[1]["experts"]["down"].get_value())
            except Exception as e:  # noqa: BLE001 - report and continue with the next transport
                out["transports"][transport] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"moe: {transport}: {out['transports'][transport]}", flush=True)
        n = len(devices)
        block = jax.random.normal(jax.random.key(2), (n, n, tokens * 2, config.hidden_size), jnp.bfloat16)
        block = jax.device_put(block, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))
        a2a = jax.jit(jax.shard_map(lambda b: jax.lax.all_to_all(b[0], "expert", 0, 0, tiled=True)[None],
                                    mesh=mesh, in_specs=jax.sharding.PartitionSpec("expert"),
                                    out_specs=jax.sharding.PartitionSpec("expert")))  # fmt: skip
        reduce = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b, "expert"), mesh=mesh,
                                       in_specs=jax.sharding.PartitionSpec("expert"),
                                       out_specs=jax.sharding.PartitionSpec("expert")))  # fmt: skip
        per_device_bytes = block.nbytes / n
        a2a_ms = median_ms(a2a, block, reps=reps)
        reduce_ms = median_ms(reduce, block, reps=reps)
        out["all_to_all_ms"], out["all_reduce_ms"] = a2a_ms, reduce_ms
        out["all_to_all_gbps"] = per_device_bytes * (n - 1) / n / a2a_ms / 1e6  # bytes leaving each GPU
        out["all_reduce_bus_gbps"] = 2 * (n - 1) / n * per_device_bytes / reduce_ms / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tune", action="store_true", help="search tokamax grouped-matmul configs first")
    parser.add_argument("--json_out", default=os.path.join(os.environ.get("OUT", "."), "moe.json"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes (a CPU check of the script itself)")
    args = parser.parse_args()
    config = ModelConfig(dtype="bfloat16", param_dtype="bfloat16")  # Ring-mini's MoE sizes
    if args.smoke:
        config = config.replace(hidden_size=64, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                                num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)  # fmt: skip
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    try:
        result["one_gpu"] = part_one(config, args.tokens, args.reps, args.tune)
    except Exception:  # noqa: BLE001
        result["one_gpu_error"] = traceback.format_exc()[-2000:]
        print(result["one_gpu_error"], flush=True)
    if jax.device_count() > 1:
        result["expert_parallel"] = part_two(config, args.tokens, args.reps)
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=1)
    print("\n| routing | gmm fwd ms | TFLOP/s | vs dense | gmm fwd+bwd ms | TFLOP/s | vs dense | routed fwd | "
          "fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result.get("one_gpu", []):
        print(f"| {row['routing']} | {row['gmm_fwd_ms']:.3f} | {row['gmm_fwd_tflops']:.0f} | "
              f"{row['gmm_fwd_vs_dense']:.2f} | {row['gmm_fwdbwd_ms']:.3f} | {row['gmm_fwdbwd_tflops']:.0f} | "
              f"{row['gmm_fwdbwd_vs_dense']:.2f} | {row['routed_fwd_ms']:.3f} | {row['routed_fwdbwd_ms']:.3f} |")
    if "expert_parallel" in result:
        ep = result["expert_parallel"]
        print(f"\nexpert={ep['devices']}, {ep['tokens_per_gpu']} tokens per GPU: all-to-all "
              f"{ep['all_to_all_gbps']:.0f} GB/s per GPU, all-reduce bus {ep['all_reduce_bus_gbps']:.0f} GB/s")
        for transport, times in ep["transports"].items():
            print(f"  {transport}: {times}")


if __name__ == "__main__":
    main()
