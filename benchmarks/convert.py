"""Checkpoint conversion speed and peak host memory on a synthetic ~2 GB bf16 HF checkpoint.

    python benchmarks/convert.py [--workdir DIR] [--shard-mb 512]

Generates random HF shards (4 × ~512 MB, names and shapes of a 10-layer 64-expert Ring-linear config), then
runs each step in its own subprocess so ru_maxrss is that step's peak alone:
  read-floor  read every tensor once through safetensors (the I/O floor; no conversion)
  from-hf     python -m ring_jax.convert from-hf (HF dir -> Orbax checkpoint)
  to-hf       python -m ring_jax.convert to-hf  (Orbax checkpoint -> HF shards + index)
and finally checks the to-hf output is bit-identical to the source.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# ~2.0 GB in bf16: 9 MoE layers × 64 experts × 3 × 1024 × 512 dominate.
CONFIG = {
    "model_type": "bailing_moe_linear",
    "architectures": ["BailingMoeLinearV2ForCausalLM"],
    "hidden_size": 1024,
    "num_hidden_layers": 10,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 32000,
    "intermediate_size": 2816,
    "moe_intermediate_size": 512,
    "moe_shared_expert_intermediate_size": 512,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "layer_group_size": 5,
    "group_norm_size": 4,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "use_qk_norm": True,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def generate(directory: Path, shard_bytes: int) -> None:
    """Random bf16 HF shards + index + config.json."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from ring_jax.config import ModelConfig, model_defaults
    from ring_jax.convert.hf_config import apply_hf_config
    from ring_jax.convert.transfer import hf_tensor_shapes

    section = model_defaults()
    apply_hf_config(section, CONFIG)
    shapes = hf_tensor_shapes(ModelConfig.from_config(section))
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for name, (shape, kind) in shapes.items():
        dtype = np.float32 if kind == "bias" else ml_dtypes.bfloat16
        tensor = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        if current and size + tensor.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=1))


def _read_floor(src: Path) -> None:
    import ml_dtypes  # noqa: F401  (numpy learns bfloat16)
    from safetensors import safe_open

    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="np") as handle:
            for name in handle.keys():  # noqa: SIM118
                handle.get_tensor(name)


def child(step: str, src: str, dst: str, shard_mb: str) -> None:
    """Runs one step in this process and prints {"seconds", "peak_rss_mb"}."""
    start = time.perf_counter()
    if step == "generate":
        generate(Path(dst), int(shard_mb) * 2**20)
    elif step == "read-floor":
        _read_floor(Path(src))
    else:
        from ring_jax.convert.__main__ import main

        shard_args = ["--max-shard-size", f"{shard_mb}MiB"] if step == "to-hf" else []
        if main([step, "--src", src, "--dst", dst, "--no-progress", *shard_args]) != 0:
            raise SystemExit(f"{step} failed")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def run_step(step: str, src: Path, dst: Path, shard_mb: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, str(src), str(dst), str(shard_mb)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> bool:
    import ml_dtypes  # noqa: F401  (numpy learns bfloat16)
    from safetensors import safe_open

    def index(directory: Path) -> dict[str, str]:
        return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]

    left, right = index(a), index(b)
    if sorted(left) != sorted(right):
        return False
    for name in left:
        with safe_open(a / left[name], "np") as x, safe_open(b / right[name], "np") as y:
            tx, ty = x.get_tensor(name), y.get_tensor(name)
            if tx.dtype != ty.dtype or tx.tobytes() != ty.tobytes():
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed after)")
    parser.add_argument("--shard-mb", type=int, default=512)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        # Generating in a child too: Linux carries the parent's peak RSS into ru_maxrss of children it spawns.
        generated = run_step("generate", work / "unused", work / "hf", args.shard_mb)
        shard_files = sorted((work / "hf").glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shard_files)
        print(
            f"synthetic checkpoint: {total / 1e9:.2f} GB in {len(shard_files)} shards (largest "
            f"{max(f.stat().st_size for f in shard_files) / 1e6:.0f} MB), generated in {generated['seconds']:.1f} s"
        )
        results = {
            "read-floor": run_step("read-floor", work / "hf", work / "unused", args.shard_mb),
            "from-hf": run_step("from-hf", work / "hf", work / "ckpt", args.shard_mb),
            "to-hf": run_step("to-hf", work / "ckpt", work / "back", args.shard_mb),
        }
        print(f"{'step':<12} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>12}")
        for step, r in results.items():
            print(f"{step:<12} {r['seconds']:8.1f} {total / 1e9 / r['seconds']:6.2f} {r['peak_rss_mb']:12.0f}")
        print(f"to-hf output bit-identical to the source: {identical(work / 'hf', work / 'back')}")


if __name__ == "__main__":
    main()
