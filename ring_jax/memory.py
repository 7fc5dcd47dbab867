"""Training memory per device for a config and a device mesh, derived from the real parameter tree (nothing is
allocated): which meshes fit Ring-mini and Ring-flash on which accelerators.

    python -m ring_jax.memory                                    # the released models on common GPUs / TPUs
    python -m ring_jax.memory --config=configs/ring_mini_linear_2.py --devices=8,16 [--json]

Per device, with every parameter sharded as `ring_jax.sharding` places it on the mesh:
  weights      master weights in model.param_dtype
  gradients    the same size and dtype as the weights
  adam         AdamW's two moments, sharded like the weights
  compute      a model.dtype copy of the weights (cast before the gather) plus two fully gathered decoder layers (the
               next layer's weights arrive while one computes)
  activations  a rough per-token estimate of what the backward pass keeps (`activation_bytes_per_token`), plus the
               chunked loss's live [loss_chunk_size, vocab] fp32 logits and their gradient
The activation term is an estimate (XLA fuses, reuses and pads buffers): a fit within about 10% is a maybe.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from ring_jax.config import ModelConfig
from ring_jax.configs import ring_flash_linear_2, ring_mini_linear_2
from ring_jax.layers.moe import ExpertBias
from ring_jax.model import abstract_model
from ring_jax.sharding import MESH_AXES, variable_sharding

GB = 1e9
# name -> bytes of memory of one device.
ACCELERATORS = {"H100 80GB": 80 * GB, "H200 141GB": 141 * GB, "TPU v5p 95GB": 95 * GB}
# JAX preallocates 75% of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION); training runs raise it to about this much.
USABLE_FRACTION = 0.9
RELEASED = {
    "Ring-mini-linear-2.0": ring_mini_linear_2.get_config,
    "Ring-flash-linear-2.0": ring_flash_linear_2.get_config,
}


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes per device of one config on one mesh (activations per micro-batch row)."""

    weights: int
    gradients: int
    adam: int
    compute: int
    activations_per_row: dict[str, int]  # remat policy ('none', 'full') -> bytes per row of seq_len tokens
    loss: int  # the chunked loss's live logits and their gradient

    @property
    def state(self) -> int:
        return self.weights + self.gradients + self.adam + self.compute

    def total(self, rows: int, remat: str) -> int:
        return self.state + self.loss + rows * self.activations_per_row[remat]


def mesh_of(sizes: dict[str, int]) -> AbstractMesh:
    """An abstract mesh over MESH_AXES (no devices needed); axes not in `sizes` are 1."""
    return AbstractMesh(tuple(sizes.get(axis, 1) for axis in MESH_AXES), MESH_AXES)


def itemsize(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def layer_bytes_per_token(config: ModelConfig, layer: int) -> int:
    """What the backward pass of one decoder layer keeps per token without activation checkpointing (bytes).

    Counted: the layer input and the norm outputs; q/k/v and their normed, rotated q/k; the attention output, the
    lightning gate and group-norm output; the router's fp32 logits and scores; each routed copy's input, gate, up,
    activation and output; the shared expert's (or the dense MLP's) gate, up and activation."""
    width = itemsize(config.dtype)
    h, d = config.hidden_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if config.is_softmax_layer(layer):
        attention = (heads + 2 * kv_heads) * d + (heads + kv_heads) * d + heads * d
    else:  # qkv, normed q/k, output, gate, group-norm output
        attention = 3 * heads * d + 2 * heads * d + 3 * heads * d
    if config.is_moe_layer(layer):
        k, inter = config.num_experts_per_tok, config.moe_intermediate_size
        shared = 3 * config.moe_shared_expert_intermediate_size * config.num_shared_experts
        mlp = k * (2 * h + 3 * inter) + shared + h
        router = 2 * config.num_experts * 4  # fp32 logits and scores
    else:
        mlp, router = 3 * config.intermediate_size + h, 0
    return width * (3 * h + attention + mlp) + router


def activation_bytes_per_token(config: ModelConfig, remat: str) -> int:
    """'none': every layer keeps `layer_bytes_per_token`; 'full': every layer keeps its input, and one layer's
    tensors exist at a time while it is recomputed."""
    per_layer = [layer_bytes_per_token(config, i) for i in range(config.num_hidden_layers)]
    if remat == "none":
        return sum(per_layer)
    return config.num_hidden_layers * config.hidden_size * itemsize(config.dtype) + max(per_layer)


@functools.cache
def persistent_leaves(config: ModelConfig) -> list[tuple[tuple, nnx.Variable]]:
    """(path, abstract variable) of every checkpointed leaf: weights and expert biases."""
    return list(nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Any(nnx.Param, ExpertBias))))


def device_memory(config: ModelConfig, mesh: AbstractMesh, *, seq_len: int, loss_chunk_size: int) -> DeviceMemory:
    """Per-device bytes of training `config` on `mesh` (the largest shard of every leaf)."""
    weights = 0
    layers: dict[tuple, int] = {}
    for path, variable in persistent_leaves(config):
        value = variable.get_value()
        shard = math.prod(variable_sharding(variable, mesh).shard_shape(value.shape))
        weights += shard * value.dtype.itemsize
        # The unsharded weights of one decoder layer (a stacked cycle leaf holds one slice per cycle).
        key = tuple(str(p) for p in path[:3]) if path[0] == "cycles" else tuple(str(p) for p in path[:2])
        per_layer = value.size // value.shape[0] if path[0] == "cycles" else value.size
        layers[key] = layers.get(key, 0) + per_layer
    compute_width = itemsize(config.dtype)
    gathered_layer = max((size for key, size in layers.items() if key[0] != "embed" and key[0] != "lm_head"),
                         default=0)  # fmt: skip
    param_width = itemsize(config.param_dtype)
    compute = weights // param_width * compute_width + 2 * gathered_layer * compute_width
    per_row = {remat: seq_len * activation_bytes_per_token(config, remat) for remat in ("none", "full")}
    loss = 2 * loss_chunk_size * config.vocab_size * 4
    return DeviceMemory(weights, weights, 2 * weights, compute, per_row, loss)


def max_rows(memory: DeviceMemory, capacity: float, remat: str, limit: int = 64) -> int:
    """The most micro-batch rows per device (powers of two up to `limit`) that fit in `capacity` bytes; 0: none."""
    rows = 0
    while rows * 2 <= limit and memory.total(max(rows * 2, 1), remat) <= capacity:
        rows = max(rows * 2, 1)
    return rows


def table(configs: dict[str, ml_collections.ConfigDict], devices: Sequence[int]) -> list[dict]:
    """One row per (config, device count): the fsdp mesh over all devices, bytes per device, rows that fit."""
    rows = []
    for name, config in configs.items():
        model_config = ModelConfig.from_config(config.model)
        for count in devices:
            memory = device_memory(model_config, mesh_of({"fsdp": count}), seq_len=config.train.seq_len,
                                   loss_chunk_size=config.train.loss_chunk_size)  # fmt: skip
            fits = {
                accelerator: {remat: max_rows(memory, capacity * USABLE_FRACTION, remat) for remat in ("none", "full")}
                for accelerator, capacity in ACCELERATORS.items()
            }
            # The config's own micro-batch: what a measured peak (benchmarks/train_step.py) compares with.
            rows_per_device = max(config.train.batch_size // config.train.grad_accum_steps // count, 1)
            remat = "full" if config.model.remat_policy == "full" else "none"  # other policies: at most 'none'
            rows.append({"model": name, "devices": count, "mesh": f"fsdp={count}", "seq_len": config.train.seq_len,
                         **dataclasses.asdict(memory), "state": memory.state, "rows_that_fit": fits,
                         "config_rows_per_device": rows_per_device,
                         "config_total": memory.total(rows_per_device, remat)})  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned markdown table (what the README shows)."""
    accelerators = list(ACCELERATORS)
    pair = lambda values: " / ".join(values)  # noqa: E731  (remat none / full)
    header = ["model", "mesh", "weights+grads+adam", "compute copy", "activations per row", *accelerators]
    lines = [header]
    for row in rows:
        lines.append([
            row["model"],
            row["mesh"],
            f"{(row['weights'] + row['gradients'] + row['adam']) / GB:.1f} GB",
            f"{row['compute'] / GB:.1f} GB",
            pair(f"{row['activations_per_row'][remat] / GB:.1f}" for remat in ("none", "full")) + " GB",
            *(pair(str(row["rows_that_fit"][a][remat] or "-") for remat in ("none", "full")) for a in accelerators),
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    lines.insert(1, ["-" * width for width in widths])
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |"
                     for line in lines)  # fmt: skip


NOTE = (
    f"Per device, training with AdamW and fp32 master weights. Accelerator columns: micro-batch rows of seq_len tokens "
    f"per device that fit in {USABLE_FRACTION:.0%} of its memory with model.remat_policy none / full ('-': not even "
    f"one row; up to 64 tried). JAX takes 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised, e.g. to .95."
)


def main() -> None:
    config_flag = config_flags.DEFINE_config_file("config", None, "A training config (default: the released models).")
    devices_flag = flags.DEFINE_list("devices", ["8", "16", "32", "64"], "Device counts (fsdp meshes over all).")
    json_flag = flags.DEFINE_bool("json", False, "Print the rows as JSON.")

    def run(argv: list[str]) -> None:
        del argv
        configs = {"config": config_flag.value} if config_flag.value is not None else {
            name: get_config() for name, get_config in RELEASED.items()}  # fmt: skip
        rows = table(configs, [int(count) for count in devices_flag.value])
        if json_flag.value:
            print(json.dumps(rows, indent=1))
            return
        print(format_table(rows))
        print(f"\n{NOTE}")

    app.run(run)


if __name__ == "__main__":
    main()
