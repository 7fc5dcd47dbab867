"""Kernel tuning before the train step compiles (GPU): tokamax grouped-matmul configs for the step's shapes."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from pallas_kernels.gmm.tuning import TunedOp, load_tuned_configs, tokamax_available, tune_grouped_matmuls
from ring_jax.train.state import StateFactory
from ring_jax.train.step import abstract_batch

KERNEL_TUNING_FILE = "kernel_tuning.json"  # in the workdir: tuned kernel configs, reused on resume


def tune_kernels(train_step: Any, factory: StateFactory, config: ml_collections.ConfigDict,
                 cache_file: str | None) -> list[TunedOp]:  # fmt: skip
    """GPU: per-shape configs for the step's tokamax grouped matmuls (see pallas_kernels.gmm.tuning), loaded from
    or saved to `cache_file`. Single-process runs only, so every process of a multi-host job compiles the same
    kernels. Prints one summary line when it tuned anything."""
    if jax.process_count() > 1 or not tokamax_available():
        return []
    loaded = load_tuned_configs(cache_file) if cache_file else None
    if loaded is not None:  # a resumed run: no lowering, no search
        print(f"train: loaded {len(loaded)} tuned grouped-matmul kernel configs from {cache_file}", flush=True)
        return loaded
    with jax.set_mesh(factory.mesh):
        lowered = train_step.lower(factory.abstract_with_shardings(),
                                   abstract_batch(config.train.batch_size, config.train.seq_len,
                                                  factory.batch_sharding()))  # fmt: skip
    tuned = tune_grouped_matmuls(lowered, cache_file)
    if tuned:
        before, after = sum(op.heuristic_ms for op in tuned), sum(op.best_ms for op in tuned)
        print(f"train: tuned {len(tuned)} grouped-matmul kernels: {before:.2f} ms -> {after:.2f} ms per pass",
              flush=True)
    return tuned
