"""Nothing lost, nothing silently wrong: the workdir lock, resume past damaged checkpoints, the saved config compared
on resume, a metrics.jsonl that a kill cannot break, the warmup clamp, non-finite config values."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from support import tiny_train_config

from ring_jax.config import ConfigError
from ring_jax.data.pipeline import make_dataset
from ring_jax.sharding import make_mesh
from ring_jax.train.checkpoint import DAMAGED_DIR, Checkpointer, ResumeError
from ring_jax.train.loop import train, validate
from ring_jax.train.metrics import MetricsWriter
from ring_jax.train.optim import effective_warmup_steps, make_optimizer
from ring_jax.train.run_config import check_resume_config, config_changes
from ring_jax.train.state import StateFactory
from ring_jax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError


def _config(**overrides):
    return tiny_train_config(optim__warmup_steps=20, **overrides)  # 20 >= train.steps=6: clamped


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real run stopped at step 4 (checkpoints 2 and 4): (workdir, TrainResult, its stdout)."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(_config(), str(workdir), stop_at_step=4)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir, result, printed.getvalue()


def _copy(tiny_run, tmp_path):
    return shutil.copytree(tiny_run[0], tmp_path / "run")


def _restore_latest(workdir):
    config = _config()
    tx, _ = make_optimizer(config.optim, config.train.steps)
    factory = StateFactory(validate(config), tx, make_mesh(config.mesh, use_all=True), seed=0)
    data = iter(make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=config.model.vocab_size))
    checkpointer = Checkpointer(str(workdir / "checkpoints"), every_n_steps=2, keep=3)
    try:
        return checkpointer.restore_latest(factory.abstract_with_shardings(), data)
    finally:
        checkpointer.close()


def _truncate_largest_data_file(step_dir):
    data_file = max(glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)


def _empty(step_dir):
    for entry in step_dir.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


DAMAGE = {
    "truncated data file": (_truncate_largest_data_file, "restoring 'state' failed: Encountered error while reading"),
    "no iterator state": (
        lambda d: (d / "data" / "process_0-of-1.json").unlink(),
        "restoring 'data' failed: .*process_0-of-1.json does not exist",
    ),
    "no manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(), "its metadata cannot be read: NOT_FOUND"),
    "emptied folder": (_empty, "its _CHECKPOINT_METADATA is missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_and_kept(tiny_run, tmp_path, capsys, kind):
    workdir = _copy(tiny_run, tmp_path)
    damage, reason = DAMAGE[kind]
    damage(workdir / "checkpoints" / "4")
    step, state = _restore_latest(workdir)
    assert step == 2 and int(state.step) == 2
    printed = capsys.readouterr().out
    assert "checkpoint: step 4 is damaged and skipped (" in printed
    assert re.search(reason, printed), printed
    assert os.listdir(workdir / "checkpoints") == ["2"]
    assert os.path.isdir(workdir / DAMAGED_DIR / "4"), "moved out of Orbax's way, never deleted"


@pytest.mark.slow
def test_no_restorable_checkpoint_is_an_error_that_keeps_them(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    _empty(workdir / "checkpoints" / "4")
    (workdir / "checkpoints" / "2" / "data" / "process_0-of-1.json").unlink()
    with pytest.raises(ResumeError, match=r"no checkpoint in .* restores \(step 4: .*; step 2: .*\); they are left"):
        _restore_latest(workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_resume_past_damage_and_a_partial_metrics_line_is_exact(tiny_run, tmp_path, capsys):
    workdir = _copy(tiny_run, tmp_path)
    _truncate_largest_data_file(workdir / "checkpoints" / "4")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a kill in the middle of a line
    result = train(_config(), str(workdir))
    assert (result.start_step, result.final_step) == (2, 6)
    first = tiny_run[1].losses
    assert {step: result.losses[step] for step in (3, 4)} == {step: first[step] for step in (3, 4)}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    printed = capsys.readouterr().out
    assert "checkpoint: step 4 is damaged and skipped" in printed and "train: resuming at step 2" in printed


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, fields",
    [
        (dict(model__hidden_size=64), "model.hidden_size: 32 -> 64"),
        (
            dict(model__num_experts_per_tok=1, model__rope_theta=5.0),
            "model.num_experts_per_tok: 2 -> 1; model.rope_theta: 10000.0 -> 5.0",
        ),
    ],
)
def test_another_architecture_is_refused_before_anything_is_written(tiny_run, tmp_path, overrides, fields):
    workdir = _copy(tiny_run, tmp_path)
    before = {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()}
    with pytest.raises(ConfigError, match=f"resuming .* with a different architecture: {fields} "):
        train(_config(**overrides), str(workdir))
    assert {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_without_config_json_the_checkpoint_shapes_name_the_first_mismatch(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    (workdir / "config.json").unlink()
    with pytest.raises(
        ResumeError,
        match=r"step 4 .* is another architecture: it holds params\.\S+ as \[\d+, 32\] "
        r"but the model expects \[\d+, 64\]",
    ):
        train(_config(model__hidden_size=64), str(workdir))
    assert not (workdir / "config.json").exists(), "config.json is written only once the checkpoint fits"


@pytest.mark.slow
def test_runtime_changes_are_listed_and_the_warmup_clamp_is_announced(tiny_run):
    workdir, _, printed = tiny_run
    assert "optim.warmup_steps=20 is not shorter than train.steps=6; warming up for 0 steps instead" in printed
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["learning_rate"] == pytest.approx(3e-3), "no warmup: step 1 runs at the peak rate"
    changed = _config(train__steps=10, optim__learning_rate=1e-3, model__dtype="bfloat16")
    assert check_resume_config(changed, str(workdir)) == [
        "model.dtype: 'float32' -> 'bfloat16'",
        "optim.learning_rate: 0.003 -> 0.001",
        "train.steps: 6 -> 10",
    ]


def test_config_changes_split_architecture_from_runtime():
    saved = {
        "model": {"hidden_size": 32, "rope_scaling": None, "scan_layers": True, "decay_layer_offset": 1},
        "mesh": {"data": 1},
        "optim": {"learning_rate": 1e-3},
    }
    new = {
        "model": {
            "hidden_size": 32,
            "rope_scaling": {"factor": 2.0, "rope_type": "linear"},
            "scan_layers": False,
            "decay_layer_offset": 0,
        },
        "mesh": {"data": 2},
        "optim": {"learning_rate": 1e-3, "new": 1},
    }
    architecture, runtime = config_changes(saved, new)
    assert architecture == [
        "model.decay_layer_offset: 1 -> 0",
        "model.rope_scaling: None -> {'factor': 2.0, 'rope_type': 'linear'}",
    ]
    assert runtime == ["mesh.data: 1 -> 2", "model.scan_layers: True -> False", "optim.new: '<absent>' -> 1"]
    # a config saved before a model field existed meant its default
    assert config_changes(saved, {**saved, "model": {**saved["model"], "use_qk_norm": True}}) == ([], [])
    assert config_changes(saved, {**saved, "model": {**saved["model"], "use_qk_norm": False}})[0] == [
        "model.use_qk_norm: True -> False"
    ]


def test_effective_warmup_steps():
    optim = tiny_train_config().optim
    for warmup, steps, expected in ((20, 10, 1), (20, 300, 20), (0, 5, 0), (5, 5, 0), (4, 5, 4), (3, 1, 0)):
        optim.warmup_steps = warmup
        assert effective_warmup_steps(optim, steps) == expected, (warmup, steps)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(optim__learning_rate=float("inf")), "optim.learning_rate: must be a finite number"),
        (dict(optim__b2=float("nan")), "optim.b2: must be a finite number"),
        (dict(model__rope_theta=float("inf")), "model.rope_theta: must be a finite number"),
    ],
)
def test_non_finite_config_values_are_refused(overrides, field):
    with pytest.raises(ConfigError, match=field):
        validate(tiny_train_config(**overrides))


# --- workdir lock --------------------------------------------------------------------------------------------------
def _write_lock(workdir, **record):
    workdir.mkdir(exist_ok=True)
    (workdir / LOCK_FILE).write_text(json.dumps(record))


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(str(workdir)):
        holder = json.loads((workdir / LOCK_FILE).read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(
            WorkdirLockedError,
            match=f"in use by another training run: host '{socket.gethostname()}' pid {os.getpid()} ",
        ):
            WorkdirLock(str(workdir)).acquire()
        with pytest.raises(WorkdirLockedError):
            train(tiny_train_config(), str(workdir))  # refused before anything is read or written
        assert os.listdir(workdir) == [LOCK_FILE]
    assert not workdir.exists(), "the lock removes its file, and the workdir it created if nothing else is there"


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path / "run", host=socket.gethostname(), pid=dead.pid, started="earlier")
    with WorkdirLock(str(tmp_path / "run")):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert (tmp_path / "run").is_dir(), "a workdir the lock did not create is kept"


@pytest.mark.parametrize(
    "host, pid, why",
    [
        ("another-host", 12345, "on another host, so that process cannot be checked from here"),
        (socket.gethostname(), os.getppid(), "its lock is free but that pid is alive"),
    ],
)
def test_a_lock_that_cannot_be_proven_stale_is_not_taken_over(tmp_path, host, pid, why):
    _write_lock(tmp_path / "run", host=host, pid=pid, started="earlier")
    with pytest.raises(WorkdirLockedError, match=f"host '{host}' pid {pid} .*{why}; if that run is gone, delete "):
        WorkdirLock(str(tmp_path / "run")).acquire()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == pid, "left as it was"


# --- metrics.jsonl -------------------------------------------------------------------------------------------------
def test_metrics_file_survives_partial_and_unreadable_lines(tmp_path, caplog):
    lines = ['{"step": 1, "loss": 1.0}', "garbage", '{"loss": 2.0}', '{"step": 3, "loss": 3.0}', '{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    writer = MetricsWriter(str(tmp_path), tensorboard=False, start_step=3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 3.0}, {"step": 4, "loss": 40.0}]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("partial last line" in w for w in warnings) and any("unreadable line 2" in w for w in warnings)


def test_each_metrics_record_is_one_write_of_a_whole_line(tmp_path, monkeypatch):
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": 1.5, "moe_load_imbalance": [1.0, 2.0]})
    writer.close()
    assert len(writes) == 1 and writes[0].endswith(b"\n") and writes[0].count(b"\n") == 1


def test_an_object_store_workdir_is_not_locked_and_nothing_local_is_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with WorkdirLock("gs://bucket/run"):
        assert os.listdir(tmp_path) == []
