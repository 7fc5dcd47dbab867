"""train.py as a subprocess: SIGTERM saves and exits cleanly; SIGKILL while saving leaves a usable checkpoint."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

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


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "run")
    process = start(workdir, "--config.train.steps=100000", "--config.checkpoint.every_n_steps=0")
    read_until(process, "train: starting at step 0")
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert process.returncode == 0, output[-3000:]
    saved = int(output.split("SIGTERM — saved step ")[1].split()[0])
    assert saved >= 2 and latest_step(workdir) == saved

    resumed = start(workdir, f"--config.train.steps={saved + 2}")
    output = finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert f"train: resuming at step {saved}" in output and latest_step(workdir) == saved + 2


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
