"""python -m ring_jax.plot: every panel draws what metrics.jsonl holds; bad input is one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ring_jax.plot import PANELS, PlotError, load_records, main, plot_metrics


def write_metrics(path, rng):
    records = []
    for step in range(1, 9):
        records.append({"step": step, "loss": float(rng.uniform(1, 5)), "learning_rate": float(rng.uniform(0, 1e-3)),
                        "grad_norm": float(rng.uniform(0, 2)), "tokens_per_second": float(rng.uniform(1e3, 2e3)),
                        "moe_load_imbalance": rng.uniform(1, 4, 2).tolist()})  # fmt: skip
        if step % 4 == 0:
            records.append({"step": step, "eval_loss": float(rng.uniform(1, 5)),
                            "eval_exact_match": float(rng.uniform(0, 1))})  # fmt: skip
    records[0]["grad_norm"] = "nan"  # how metrics.jsonl stores a non-finite value
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_panels_draw_the_recorded_values(tmp_path, rng):
    records = write_metrics(tmp_path / "metrics.jsonl", rng)
    figure = plot_metrics(load_records(tmp_path / "metrics.jsonl"))
    drawn = {ax.get_title(): {line.get_label(): line.get_xydata() for line in ax.get_lines()} for ax in figure.axes}
    assert list(drawn) == list(PANELS)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]

    def expect(rows, key, index=None):
        values = [r[key] if index is None else r[key][index] for r in rows]
        return np.array([[r["step"], float(v)] for r, v in zip(rows, values, strict=True)])

    np.testing.assert_array_equal(drawn["loss"]["loss"], expect(train, "loss"))
    np.testing.assert_array_equal(drawn["loss"]["eval_loss"], expect(evals, "eval_loss"))
    np.testing.assert_array_equal(drawn["learning rate"]["learning_rate"], expect(train, "learning_rate"))
    assert np.isnan(drawn["gradient norm"]["grad_norm"][0, 1])
    np.testing.assert_array_equal(drawn["tokens / s"]["tokens_per_second"], expect(train, "tokens_per_second"))
    imbalance = drawn["MoE load imbalance (max / mean)"]
    assert sorted(imbalance) == ["MoE layer 0", "MoE layer 1"]
    np.testing.assert_array_equal(imbalance["MoE layer 1"], expect(train, "moe_load_imbalance", 1))
    np.testing.assert_array_equal(drawn["eval exact match"]["eval_exact_match"], expect(evals, "eval_exact_match"))


def test_cli_writes_a_png_and_names_bad_input(tmp_path, rng, capsys):
    write_metrics(tmp_path / "metrics.jsonl", rng)
    assert main(["--workdir", str(tmp_path), "--out", str(tmp_path / "plots" / "m.png")]) == 0
    assert (tmp_path / "plots" / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--workdir", str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing' / 'metrics.jsonl'}: no metrics file" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    with pytest.raises(PlotError, match=r"metrics.jsonl:2: a record needs a 'step'"):
        load_records(tmp_path / "bad" / "metrics.jsonl")
    assert not (tmp_path / "missing").exists()
