"""Metrics: metrics.jsonl (one JSON object per logged step), TensorBoard events (tensorboardX), tqdm bar."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping

import numpy as np
import tqdm

log = logging.getLogger(__name__)


def _plain(value):
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf literals
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _step_of(line: bytes) -> int | None:
    """The record's step, or None for a line that is not a complete metrics record."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites `path` (atomically) keeping the records of steps <= `step`; drops unreadable lines with a warning.

    A kill while a line is being written can leave a partial last line; it must not block the resume.
    """
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        line_step = _step_of(line)
        if line_step is None:
            where = "its partial last line" if number >= len(lines) - 1 else f"unreadable line {number}"
            log.warning("%s: dropped %s (%r...)", path, where, line[:60])
        elif line_step <= step:
            kept.append(line + b"\n")
    with open(path + ".tmp", "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


class MetricsWriter:
    """Appends one JSON line per `write` to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 writes (the others get a no-op writer) so multi-host runs produce one file. On a resume from
    `start_step`, records of later steps (written before a crash, about to be redone) are dropped first, so the file
    keeps one record per step. Each record goes out as one `write` of a whole line to an append-only descriptor,
    so a killed run leaves complete lines (a partial one, e.g. from a full disk, is dropped on the next start).
    """

    def __init__(self, workdir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 enabled: bool = True, start_step: int = 0):
        self._enabled = enabled
        self._fd: int | None = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, filename)
        _drop_records_after(path, start_step)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{key: _plain(value) for key, value in metrics.items()}}
        os.write(self._fd, (json.dumps(record) + "\n").encode())
        if self._tb is None:
            return
        for key, value in metrics.items():
            array = np.asarray(value)
            if array.ndim == 0:
                self._tb.add_scalar(key, float(array), step)
            else:  # per-layer vectors: one scalar per layer
                for index, item in enumerate(array.reshape(-1)):
                    self._tb.add_scalar(f"{key}/{index}", float(item), step)
        self._tb.flush()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """tqdm bar over optimizer steps showing loss and tokens/s."""

    def __init__(self, *, start: int, total: int, enabled: bool = True):
        self._bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled,
                              dynamic_ncols=True)

    def update(self, steps: int, *, loss: float | None = None, tokens_per_second: float | None = None):
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second or 0:,.0f}", refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
