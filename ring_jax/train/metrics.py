"""Metrics: metrics.jsonl (one JSON object per logged step), TensorBoard events (tensorboardX), tqdm bar."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
import tqdm


def _plain(value):
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf literals
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _drop_records_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsWriter:
    """Appends one JSON line per `write` to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 writes (the others get a no-op writer) so multi-host runs produce one file. On a resume from
    `start_step`, records of later steps (written before a crash, about to be redone) are dropped first, so the file
    keeps one record per step.
    """

    def __init__(self, workdir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 enabled: bool = True, start_step: int = 0):
        self._enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, filename)
        _drop_records_after(path, start_step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{key: _plain(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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
        if self._file is not None:
            self._file.close()
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
