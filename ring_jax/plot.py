"""Plots a run's metrics.jsonl as one PNG, for users without TensorBoard (needs matplotlib: `pip install
'ring_jax[plot]'`).

    python -m ring_jax.plot --workdir runs/default [--out runs/default/metrics.png]

Panels: training and eval loss; learning rate; gradient norm; tokens/s; MoE load imbalance (max / mean expert load)
of every MoE layer; eval exact-match accuracy (when the run evaluated the synthetic tasks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ring_jax.errors import RingJaxError

METRICS_FILE = "metrics.jsonl"
# Panel title -> the record keys drawn in it (a per-layer list draws one line per layer).
PANELS = {
    "loss": ("loss", "eval_loss"),
    "learning rate": ("learning_rate",),
    "gradient norm": ("grad_norm",),
    "tokens / s": ("tokens_per_second",),
    "MoE load imbalance (max / mean)": ("moe_load_imbalance",),
    "eval exact match": ("eval_exact_match",),
}


class PlotError(RingJaxError):
    """A metrics file that cannot be plotted; the message names the file."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (training records and eval records, each with its `step`)."""
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"{path}: no metrics file (a training workdir holds {METRICS_FILE})")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{number}: not a JSON object ({e})") from e
        if not isinstance(record, dict) or "step" not in record:
            raise PlotError(f"{path}:{number}: a record needs a 'step'")
        records.append(record)
    if not records:
        raise PlotError(f"{path}: no records yet")
    return records


def series(records: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{label: (steps, values)} of `key`: one series for a scalar, one per layer for a list."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if key not in record:
            continue
        value = record[key]
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for layer, item in items:
            label = key if layer is None else f"MoE layer {layer}"
            steps, values = out.setdefault(label, ([], []))
            steps.append(int(record["step"]))
            values.append(float(item))  # numbers, or 'nan' / 'inf' strings (not JSON literals)
    return out


def plot_metrics(records: list[dict[str, Any]]) -> Any:
    """A matplotlib Figure with one panel per entry of PANELS (empty panels say so)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    columns = 3
    rows = math.ceil(len(PANELS) / columns)  # 2 x 3: no empty grid cell
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, PANELS.items(), strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        drawn = False
        for key in keys:
            for label, (steps, values) in series(records, key).items():
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        elif len(ax.get_lines()) > 1:
            ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ring_jax.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--workdir", required=True, help="training workdir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: WORKDIR/metrics.png)")
    parser.add_argument("--metrics-file", default=METRICS_FILE, help="metrics file name in the workdir")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.workdir) / "metrics.png"
    try:
        records = load_records(Path(args.workdir) / args.metrics_file)
        try:
            figure = plot_metrics(records)
        except ModuleNotFoundError as e:
            raise PlotError(f"{e.name} is not installed: pip install 'ring_jax[plot]' (or matplotlib)") from e
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
