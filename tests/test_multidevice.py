"""Runs tests/multidevice_cases.py in a process with 8 virtual CPU devices (the device count is fixed when JAX
starts, and this process has one) and fails with its report if any case fails."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("multidevice_cases.py")


@pytest.mark.slow
def test_sharded_training_on_8_devices_equals_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        cwd=CASES.parent, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " skipped" not in result.stdout and " failed" not in result.stdout, report
