"""train.py as a subprocess: SIGTERM saves and exits cleanly (a second run on the busy workdir is refused); SIGKILL
while saving leaves a usable checkpoint; command-line mistakes are one-line errors.

Each train.py run has a hard wall-clock limit (`TIMEOUT_S` from its start) enforced by the test, whether or not the
run prints anything; past it the run's process group is killed and the test fails with the run's output.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from support import TINY_TRAIN_FLAGS, ChildProcess

from ring_jax.train.checkpoint import Checkpointer

TIMEOUT_S = 240


def start(log_file: Path, workdir: Path, *flags: str) -> ChildProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "train.py", f"--workdir={workdir}", *TINY_TRAIN_FLAGS, *flags]
    return ChildProcess(command, log_file=log_file, timeout_s=TIMEOUT_S, env=env)


def latest_step(workdir: Path) -> int | None:
    checkpointer = Checkpointer(str(workdir / "checkpoints"), every_n_steps=1, keep=3)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_and_a_second_run_is_refused_meanwhile(tmp_path):
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"
    with start(tmp_path / "first.log", workdir, "--config.train.steps=100000",
               "--config.checkpoint.every_n_steps=0") as run:  # fmt: skip
        run.wait_for("train: starting at step 0")
        run.wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, "two logged steps")
        config_json = (workdir / "config.json").read_bytes()
        with start(tmp_path / "second.log", workdir) as second:
            refusal = second.finish()
        assert second.returncode == 2, refusal[-3000:]
        assert refusal.startswith(f"train: workdir {workdir} is in use by another training run: host ")
        assert f" pid {run.process.pid} " in refusal and refusal.count("\n") == 1, refusal
        assert (workdir / "config.json").read_bytes() == config_json
        run.send_signal(signal.SIGTERM)
        output = run.finish()
    assert run.returncode == 0, output[-3000:]
    saved = int(output.split("SIGTERM — saved step ")[1].split()[0])
    assert saved >= 2 and latest_step(workdir) == saved

    # a quick run shorter than its warmup just works; the changed runtime settings are listed in one line
    with start(tmp_path / "resumed.log", workdir, f"--config.train.steps={saved + 2}",
               "--config.optim.warmup_steps=1000000") as resumed:  # fmt: skip
        output = resumed.finish()
    assert resumed.returncode == 0, output[-3000:]
    assert f"train: resuming at step {saved}" in output and latest_step(workdir) == saved + 2
    changes = next(line for line in output.splitlines() if line.startswith("train: resuming with changed runtime"))
    assert "optim.warmup_steps: 1 -> 1000000" in changes and f"train.steps: 100000 -> {saved + 2}" in changes
    assert (f"optim.warmup_steps=1000000 is not shorter than train.steps={saved + 2}; warming up for "
            f"{(saved + 2) // 10} steps instead") in output


def test_sigkill_while_saving_keeps_the_previous_checkpoint_usable(tmp_path):
    workdir = tmp_path / "run"
    with start(tmp_path / "killed.log", workdir, "--config.train.steps=100000",
               "--config.checkpoint.every_n_steps=2") as run:  # fmt: skip
        # "saving step 6" is printed before save(6) is called; save(4) began earlier and waited for save(2) to
        # commit, so at this moment step 2 is complete and step 4 may still be being written.
        run.wait_for("checkpoint: saving step 6")
        run.kill()
    latest = latest_step(workdir)
    assert latest in (2, 4), latest  # step 4 is either fully committed or ignored, never half-read

    with start(tmp_path / "resumed.log", workdir, f"--config.train.steps={latest + 2}") as resumed:
        output = resumed.finish()
    assert resumed.returncode == 0, output[-3000:]
    assert f"train: resuming at step {latest}" in output
    assert latest_step(workdir) == latest + 2
    leftovers = [name for name in os.listdir(workdir / "checkpoints") if "tmp" in name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=5"], "train: --config.train.stepz=5: no config field 'stepz' "
                                 '(Did you mean "steps" instead of "stepz"?)'),
    (["--config=configs/default.py", "--config.trainn.steps=5"],
     "train: --config.trainn.steps=5: no config field 'trainn' (Did you mean \"train\" instead of \"trainn\"?)"),
    (["--config=no/such/config.py"], "train: --config: no config file 'no/such/config.py'"),
    (["--config.optim.learning_rate=inf"], "train: optim.learning_rate: must be a finite number (got inf)"),
])  # fmt: skip
def test_command_line_mistakes_are_one_line_errors(tmp_path, args, message):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "train.py", f"--workdir={tmp_path / 'run'}", *args]
    with ChildProcess(command, log_file=tmp_path / "cli.log", timeout_s=TIMEOUT_S, env=env) as cli:
        output = cli.finish()
    assert cli.returncode == 2, output[-3000:]
    assert output.startswith(message) and output.count("\n") == 1, output
    assert not (tmp_path / "run").exists()
