"""Runs tests/multidevice_cases.py in a process with 8 virtual CPU devices (the device count is fixed when JAX
starts, and this process has one) and fails with its report if any case fails."""

import subprocess
import sys
from pathlib import Path

import pytest
from support import cpu_devices_env

CASES = Path(__file__).with_name("multidevice_cases.py")


# One case runs in every test run: the mesh that composes FSDP, tensor and expert parallelism, the fixed-capacity
# all-to-all transport and an AdamW step with sharded moments. The full matrix is the slow test.
QUICK_CASE = "test_sharded_step_equals_one_device[fsdp=2,tensor=2,expert=2-all_to_all-True]"


def run_cases(*selection: str) -> None:
    env = cpu_devices_env(8)
    targets = [f"{CASES}::{name}" for name in selection] or [str(CASES)]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets],
        cwd=CASES.parent, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " skipped" not in result.stdout and " failed" not in result.stdout, report


def test_composed_mesh_training_step_on_8_devices_equals_one_device():
    run_cases(QUICK_CASE)


@pytest.mark.slow
def test_sharded_training_on_8_devices_equals_one_device():
    run_cases()
