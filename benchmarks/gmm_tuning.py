"""How much do tokamax's grouped-matmul kernel configs matter on this card, for the MoE layer's shapes?

    python benchmarks/gmm_tuning.py --config=configs/ring_mini_linear_2.py --config.model.num_experts=16 \
        --config.train.seq_len=4096 --config.train.batch_size=2

Builds the MoE expert pass (gate_up and down grouped matmuls, forward + backward) at the step's token count, runs
`pallas_kernels.gmm.tuning.tune_grouped_matmuls` on it (the search train.py runs before compiling), prints the
heuristic vs best time of every kernel, then the whole fwd+bwd before and after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from benchmarks.profiling import median_ms
from pallas_kernels.gmm import grouped_matmul
from pallas_kernels.gmm.tuning import tune_grouped_matmuls
from ring_jax.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ring_mini_linear_2.py", "Model + training config.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)
    config = _CONFIG.value
    model = ModelConfig.from_config(config.model)
    rows = config.train.batch_size * config.train.seq_len * model.num_experts_per_tok
    hidden, inter, experts = model.hidden_size, model.moe_intermediate_size, model.num_experts
    rng = np.random.default_rng(0)
    group_sizes = jnp.asarray(np.bincount(rng.integers(0, experts, rows), minlength=experts), jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(rows, hidden)), jnp.bfloat16)
    gate_up = jnp.asarray(rng.normal(size=(experts, hidden, 2 * inter)) * 0.02, jnp.bfloat16)
    down = jnp.asarray(rng.normal(size=(experts, inter, hidden)) * 0.02, jnp.bfloat16)

    def expert_pass(lhs, gate_up, down):
        out = grouped_matmul(lhs, gate_up, group_sizes, implementation="tokamax")
        return grouped_matmul(jax.nn.silu(out[:, :inter]) * out[:, inter:], down, group_sizes, implementation="tokamax")

    def fwd_bwd(lhs, gate_up, down):
        out, pullback = jax.vjp(expert_pass, lhs, gate_up, down)
        return pullback(jnp.ones_like(out) * 1e-3)

    args = (lhs, gate_up, down)
    flops = 3 * 2 * rows * hidden * 3 * inter
    before = median_ms(jax.jit(fwd_bwd), *args)
    print(f"{jax.devices()[0].device_kind}: expert pass fwd+bwd {before:.3f} ms ({flops / before / 1e9:.0f} TFLOP/s) "
          "on heuristic configs", flush=True)
    records = tune_grouped_matmuls(jax.jit(fwd_bwd).lower(*args))
    print("| kernel | operand shapes | heuristic ms | best ms | best config |\n|---|---|---|---|---|")
    for record in records:
        print(f"| {record.name} | {record.shapes} | {record.heuristic_ms:.3f} | {record.best_ms:.3f} | "
              f"{record.best_config} |")
    after = median_ms(jax.jit(fwd_bwd), *args)
    print(f"expert pass fwd+bwd after tuning {after:.3f} ms ({flops / after / 1e9:.0f} TFLOP/s); "
          f"before {before:.3f} ms", flush=True)


if __name__ == "__main__":
    app.run(main)
