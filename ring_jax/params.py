"""Parameter counts from the real module tree, without allocating weights (`nnx.eval_shape`).

    python -m ring_jax.params --config=configs/ring_mini_linear_2.py [--json]

total: every checkpoint tensor (weights and expert biases); activated: what one token touches (routed experts count
top_k / num_experts of their size); activated_non_embedding: activated minus the embedding table and the lm_head.
"""

from __future__ import annotations

import json
import math

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ring_jax.config import ModelConfig
from ring_jax.layers.moe import ExpertBias
from ring_jax.model import abstract_model

EMBEDDING_PATHS = (("embed", "embedding"), ("lm_head", "kernel"))


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """{'total', 'activated', 'activated_non_embedding'} counted over the module tree."""
    state = nnx.state(abstract_model(config), nnx.Any(nnx.Param, ExpertBias))
    total = activated = embedding = 0
    for path, leaf in nnx.to_flat_state(state):
        size = math.prod(leaf.get_value().shape)
        names = tuple(str(part) for part in path)
        total += size
        if "experts" in names:  # routed experts [E, ...]: a token uses top_k of them
            activated += size * config.num_experts_per_tok // config.num_experts
        else:
            activated += size
        if names in EMBEDDING_PATHS:
            embedding += size
    return {"total": total, "activated": activated, "activated_non_embedding": activated - embedding}


def main() -> None:
    # Flags are defined here, not at import, so that importing this module defines no absl flags.
    config_flag = config_flags.DEFINE_config_file("config", "configs/ring_mini_linear_2.py", "Model config file.")
    json_flag = flags.DEFINE_bool("json", False, "Print one JSON object with integer counts.")

    def run(argv: list[str]) -> None:
        del argv
        counts = count_parameters(ModelConfig.from_config(config_flag.value.model))
        if json_flag.value:
            print(json.dumps(counts))
            return
        for name, value in counts.items():
            print(f"{name:>24}: {value:>16,d}  ({value / 1e9:.3f} B)")

    app.run(run)


if __name__ == "__main__":
    main()
