"""train.py as a subprocess: SIGTERM saves and exits cleanly; SIGKILL while saving leaves a usable checkpoint."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from test_train_helpers import REPO, TINY_OVERRIDES

from ring_jax.train.checkpoint import Checkpointer

TIMEOUT_S = 240


def start(workdir, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "train.py", f"--workdir={workdir}", *TINY_OVERRIDES, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def read_until(process: subprocess.Popen, marker: str) -> list[str]:
    """Reads output lines until one contains `marker` (fails if the process ends or time runs out)."""
    lines, deadline = [], time.monotonic() + TIMEOUT_S
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return lines
        assert time.monotonic() < deadline, "timed out waiting for " + marker
    raise AssertionError(f"process ended before printing {marker!r}:\n{''.join(lines[-30:])}")


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return output


def latest_step(workdir) -> int | None:
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_n_steps=1, keep=3)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def test_sigterm_saves_and_exits_cleanly_and_a_second_run_is_refused_meanwhile(tmp_path):
    workdir = str(tmp_path / "run")
    process = start(workdir, "--config.train.steps=100000", "--config.checkpoint.every_n_steps=0")
    read_until(process, "train: starting at step 0")
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    config_json = (pathlib.Path(workdir) / "config.json").read_bytes()
    second = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *TINY_OVERRIDES], cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert second.returncode == 2 and second.stdout == "", second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stderr.startswith(f"train: workdir {workdir} is in use by another training run: host ")
    assert f" pid {process.pid} " in second.stderr and second.stderr.count("\n") == 1, second.stderr
    assert (pathlib.Path(workdir) / "config.json").read_bytes() == config_json
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert process.returncode == 0, output[-3000:]
    saved = int(output.split("SIGTERM — saved step ")[1].split()[0])
    assert saved >= 2 and latest_step(workdir) == saved

    # a quick run shorter than its warmup just works; the changed runtime settings are listed in one line
    resumed = start(workdir, f"--config.train.steps={saved + 2}", "--config.optim.warmup_steps=1000000")
    output = finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert f"train: resuming at step {saved}" in output and latest_step(workdir) == saved + 2
    changes = next(line for line in output.splitlines() if line.startswith("train: resuming with changed runtime"))
    assert "optim.warmup_steps: 1 -> 1000000" in changes and f"train.steps: 100000 -> {saved + 2}" in changes
    assert (f"optim.warmup_steps=1000000 is not shorter than train.steps={saved + 2}; warming up for "
            f"{(saved + 2) // 10} steps instead") in output


def test_sigkill_while_saving_keeps_the_previous_checkpoint_usable(tmp_path):
    workdir = str(tmp_path / "run")
    process = start(workdir, "--config.train.steps=100000", "--config.checkpoint.every_n_steps=2")
    # "saving step 6" is printed before save(6) is called; save(4) began earlier and waited for save(2) to
    # commit, so at this moment step 2 is complete and step 4 may still be being written.
    read_until(process, "checkpoint: saving step 6")
    process.kill()
    process.wait(timeout=TIMEOUT_S)
    latest = latest_step(workdir)
    assert latest in (2, 4), latest  # step 4 is either fully committed or ignored, never half-read

    resumed = start(workdir, f"--config.train.steps={latest + 2}")
    output = finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert f"train: resuming at step {latest}" in output
    assert latest_step(workdir) == latest + 2
    leftovers = [name for name in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=5"], "train: --config.train.stepz=5: no config field 'stepz' "
                                 '(Did you mean "steps" instead of "stepz"?)'),
    (["--config=configs/default.py", "--config.trainn.steps=5"],
     "train: --config.trainn.steps=5: no config field 'trainn' (Did you mean \"train\" instead of \"trainn\"?)"),
    (["--config=no/such/config.py"], "train: --config: no config file 'no/such/config.py'"),
    (["--config.optim.learning_rate=inf"], "train: optim.learning_rate: must be a finite number (got inf)"),
])
def test_command_line_mistakes_are_one_line_errors(tmp_path, args, message):
    result = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'run'}", *args], cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 2 and result.stdout == "", result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()
