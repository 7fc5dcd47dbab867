"""Per-shape config search for tokamax's grouped-matmul kernels (GPU), done once before the train step compiles.

tokamax picks a kernel config from its autotuning cache, and on a miss from a heuristic (64-row tiles on Hopper).
For the MoE shapes of a step that heuristic is 1.3-1.6x slower than the best config of a small search (measured
on an H100, benchmarks/gmm_tuning.py). `tune_grouped_matmuls` finds every tokamax grouped matmul in a lowered
function (forward, dlhs and drhs kernels), times the candidates on device, and leaves the fastest in tokamax's
in-process cache, so the next trace uses them; results are saved to a JSON file that `load_tuned_configs` reads
back, so a resumed run skips the search. Without a GPU or tokamax it does nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, NamedTuple

import jax

from pallas_kernels.gmm.api import GROUPED_MATMUL


def tokamax_available() -> bool:
    """True on a GPU where the "tokamax" grouped matmul can run (the candidate configs below are GPU ones)."""
    return jax.default_backend() == "gpu" and GROUPED_MATMUL.unavailable_reason("tokamax") is None


class TunedOp(NamedTuple):
    """One tuned kernel: operand shapes, heuristic and best median ms (NaN when loaded from a file, searched=False)."""

    name: str
    shapes: str
    heuristic_ms: float
    best_ms: float
    best_config: str
    searched: bool


def candidate_configs(heuristic: Any) -> set[Any]:
    """The heuristic config and its variations over row-tile size, k-tile size, pipeline stages, persistence and
    grid tiling: the knobs of tokamax's own sm90 search, narrowed to values that won on an H100."""
    knobs = itertools.product((64, 128), (64, 128), (2, 4), (False, True), (1, 8))
    return {heuristic} | {
        dataclasses.replace(heuristic, block_m=m, block_k=k, num_stages=s, persistent=p, grid_tile_width=w)
        for m, k, s, p, w in knobs
    }


def _is_grouped_matmul(bound_args: Any) -> bool:
    return "RaggedDot" in type(bound_args.op).__name__


def _shapes(bound_args: Any) -> str:
    return " ".join(str(tuple(a.shape)) for a in bound_args.args if hasattr(a, "shape"))


def load_tuned_configs(cache_file: str) -> list[TunedOp] | None:
    """Installs the configs `tune_grouped_matmuls` saved to `cache_file` in tokamax's in-process cache; None when
    there is no such file or it was tuned on another card kind (then search again). Clears JAX's caches."""
    if not (tokamax_available() and os.path.exists(cache_file)):
        return None
    import tokamax

    with open(cache_file, encoding="utf-8") as f:
        result = tokamax.AutotuningResult.loads(f.read())
    if result.device_kind != jax.devices()[0].device_kind:
        return None
    for bound_args, data in result.data:
        bound_args.op.get_autotuning_cache()[bound_args.autotuning_cache_key] = data
    jax.clear_caches()
    return [TunedOp(type(ba.op).__name__, _shapes(ba), float("nan"), float("nan"), str(data.fastest_config),
                    searched=False) for ba, data in result.data]  # fmt: skip


def tune_grouped_matmuls(lowered: jax.stages.Lowered, cache_file: str | None = None) -> list[TunedOp]:
    """Searches configs for every tokamax grouped matmul in `lowered`, keeps the fastest in tokamax's in-process
    cache (and saves them to `cache_file`); returns what it found.

    Clears JAX's caches afterwards so that functions traced before pick the new configs when traced again.
    """
    if not tokamax_available():
        return []
    import tokamax
    from tqdm import tqdm

    bound = [ba for ba in tokamax.autotuning.get_bound_args(lowered) if _is_grouped_matmul(ba)]
    tuned, records = [], []
    for bound_args in tqdm(bound, desc="tuning grouped matmuls", unit="kernel"):
        heuristic = bound_args.heuristics_config
        data = bound_args.autotune(configs=candidate_configs(heuristic), cache_results=True)
        timings = data.prune_errors()
        best = data.fastest_config
        heuristic_ms = timings[heuristic].median_evaluation_time_ms if heuristic in timings else float("nan")
        records.append(TunedOp(type(bound_args.op).__name__, _shapes(bound_args), heuristic_ms,
                               timings[best].median_evaluation_time_ms, str(best), searched=True))  # fmt: skip
        tuned.append((bound_args, data.prune()))
    if cache_file and tuned:
        with open(cache_file, "w", encoding="utf-8") as f:
            f.write(tokamax.AutotuningResult(jax.devices()[0].device_kind, tuple(tuned)).dumps(prune_errors=True))
    jax.clear_caches()
    return records
