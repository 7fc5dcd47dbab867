"""Per-shape config search for tokamax's grouped-matmul kernels (GPU), done once before the train step compiles.

tokamax picks a kernel config from its autotuning cache, and on a miss from a heuristic (64-row tiles on Hopper),
which for the MoE shapes of a step is slower than the best config of a small search (BENCHMARKS.md,
benchmarks/gmm_tuning.py). `tune_grouped_matmuls` finds every tokamax grouped matmul in a lowered function
(forward, dlhs and drhs kernels), times the candidates on device, and leaves the fastest in tokamax's in-process
cache, so the next trace uses them; results are saved to a JSON file that `load_tuned_configs` reads back, so a
resumed run skips the search. Without a GPU or tokamax it does nothing.

The file (`write_tuning_file` / `read_tuning_file`) holds tokamax's serialised result together with the card kind
it was measured on; it is written atomically, and a file from another card kind, an older format or a run killed
while writing is never used: the search simply runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import tempfile
from typing import Any, NamedTuple

import jax

from pallas_kernels.gmm.api import GROUPED_MATMUL

TUNING_FILE_FORMAT = "pallas_kernels.gmm.tuning/1"
log = logging.getLogger(__name__)


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
    grid tiling: the knobs of tokamax's own sm90 search, narrowed to the values that won in benchmarks/gmm_tuning.py
    runs."""
    knobs = itertools.product((64, 128), (64, 128), (2, 4), (False, True), (1, 8))
    return {heuristic} | {
        dataclasses.replace(heuristic, block_m=m, block_k=k, num_stages=s, persistent=p, grid_tile_width=w)
        for m, k, s, p, w in knobs
    }


def _is_grouped_matmul(bound_args: Any) -> bool:
    return "RaggedDot" in type(bound_args.op).__name__


def _shapes(bound_args: Any) -> str:
    return " ".join(str(tuple(a.shape)) for a in bound_args.args if hasattr(a, "shape"))


def write_tuning_file(path: str, device_kind: str, autotuning_result: str) -> None:
    """Saves tokamax's serialised autotuning result with the card kind it was measured on. Atomic: written to a
    temporary file beside `path`, then renamed over it, so a run killed meanwhile leaves the previous file (or none)."""
    directory, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump({"format": TUNING_FILE_FORMAT, "device_kind": device_kind,
                       "autotuning_result": autotuning_result}, f)  # fmt: skip
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def read_tuning_file(path: str, device_kind: str) -> str | None:
    """The autotuning result `write_tuning_file` saved for `device_kind`. None (search again) when there is no such
    file, when it was measured on another card kind, or when it is not a complete file of this format (logged)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read tuned kernel configs (%s); searching again", path, e)
        return None
    if not (isinstance(saved, dict) and saved.get("format") == TUNING_FILE_FORMAT
            and isinstance(saved.get("autotuning_result"), str)):  # fmt: skip
        log.warning("%s: not a %s file; searching again", path, TUNING_FILE_FORMAT)
        return None
    if saved.get("device_kind") != device_kind:
        log.info("%s holds configs tuned on %r, not on this %r; searching again", path, saved.get("device_kind"),
                 device_kind)  # fmt: skip
        return None
    return saved["autotuning_result"]


def load_tuned_configs(cache_file: str) -> list[TunedOp] | None:
    """Installs the configs `tune_grouped_matmuls` saved to `cache_file` in tokamax's in-process cache; None when
    there is nothing usable for this card kind in the file (see `read_tuning_file`). Clears JAX's caches."""
    if not tokamax_available():
        return None
    saved = read_tuning_file(cache_file, jax.devices()[0].device_kind)
    if saved is None:
        return None
    import tokamax

    result = tokamax.AutotuningResult.loads(saved)
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
        device_kind = jax.devices()[0].device_kind
        result = tokamax.AutotuningResult(device_kind, tuple(tuned)).dumps(prune_errors=True)
        write_tuning_file(cache_file, device_kind, result)
    jax.clear_caches()
    return records
