"""Timing helpers of the benchmarks: median wall time of a call, and per-kernel device time from a JAX profiler
trace (no extra packages: the Perfetto JSON).

    ms = median_ms(fn, *args)        # after one warm-up call
    ms = back_to_back_ms(fn, *args)  # sub-millisecond kernels: calls queued back to back, one sync per round
    rows = kernel_times(fn, *args)   # [(kernel name, ms per call, launches per call)], longest first

Used by the benchmarks to say where a part's time goes; on CPU the trace holds no device kernels (empty list).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax


def median_ms(fn: Callable, *args: Any, reps: int = 10) -> float:
    """Median milliseconds of `reps` synchronised calls, after one untimed (compiling) call."""
    return back_to_back_ms(fn, *args, reps=1, rounds=reps)


def back_to_back_ms(
    fn: Callable, *args: Any, reps: int = 20, rounds: int = 5, wait: Callable[[Any], Any] = jax.block_until_ready
) -> float:
    """Median over `rounds` of the mean ms per call of `reps` calls queued back to back with one synchronisation.
    For sub-millisecond kernels: a synchronised call adds the host's launch and wake-up latency (tens of
    microseconds, and jittery) to each sample; queued calls run one after another on the device. `wait(outputs)`
    blocks until they are computed (another framework's calls: e.g. `lambda _: torch.cuda.synchronize()`)."""
    wait(fn(*args))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(reps)]
        wait(outs)
        samples.append((time.perf_counter() - start) * 1e3 / reps)
    return statistics.median(samples)


def kernel_times(fn: Callable, *args: Any, reps: int = 3) -> list[tuple[str, float, float]]:
    """Run `fn(*args)` (already compiled) `reps` times under the profiler; sum device events by kernel name."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {
        e["pid"] for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:" in e["args"].get("name", "")
    }  # fmt: skip
    threads = {
        (e["pid"], e["tid"]): e["args"].get("name", "") for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device_pids
    }  # fmt: skip
    # Kernels sit on "Stream #n" threads; the "XLA Ops" / "XLA Modules" threads repeat them as HLO spans.
    streams = {key for key, name in threads.items() if name.startswith("Stream")} or set(threads)
    total_us: dict[str, float] = collections.defaultdict(float)
    launches: dict[str, int] = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and (event.get("pid"), event.get("tid")) in streams and "dur" in event:
            total_us[event["name"]] += event["dur"]
            launches[event["name"]] += 1
    rows = [(name, us / reps / 1e3, launches[name] / reps) for name, us in total_us.items()]
    return sorted(rows, key=lambda row: -row[1])


# Kernel-name patterns -> the part of a step they belong to (first match wins).
CATEGORIES = (
    ("grouped matmul", re.compile(r"ragged")),
    ("attention", re.compile(r"flash|batched_body|sdpa|fmha|cudnn")),
    ("lightning", re.compile(r"lightning")),
    ("dense matmul", re.compile(r"gemm|nvjet|xmma|cutlass|dot")),
    ("copies", re.compile(r"[Mm]emcpy|[Mm]emset|copy")),
    ("gather / scatter", re.compile(r"gather|scatter")),
    ("slices", re.compile(r"dynamic")),
    ("reductions", re.compile(r"reduce")),
)


def categorise(rows: list[tuple[str, float, float]]) -> dict[str, float]:
    """ms per category (see CATEGORIES), everything else under 'other fusions'."""
    totals: dict[str, float] = collections.defaultdict(float)
    for name, ms, _ in rows:
        label = next((label for label, pattern in CATEGORIES if pattern.search(name)), "other fusions")
        totals[label] += ms
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def print_kernel_table(title: str, rows: list[tuple[str, float, float]], top: int = 15) -> None:
    """Markdown tables: time per category, then the `top` longest kernels."""
    total = sum(ms for _, ms, _ in rows)
    print(f"\n{title}: by category\n| category | ms | % |\n|---|---|---|")
    for label, ms in categorise(rows).items():
        print(f"| {label} | {ms:.3f} | {100 * ms / max(total, 1e-9):.1f} |")
    print(f"\n{title}: {total:.3f} ms of device kernels per call, {sum(n for *_, n in rows):.0f} launches")
    print("| kernel | ms | % | launches |\n|---|---|---|---|")
    for name, ms, count in rows[:top]:
        print(f"| {name[:90]} | {ms:.3f} | {100 * ms / max(total, 1e-9):.1f} | {count:.0f} |")
