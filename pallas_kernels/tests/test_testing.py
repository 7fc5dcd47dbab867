"""The shared test support: a failing test's report shows the seed of its random inputs, the seed replays them, and
`gpu` tests are skipped off the GPU (pytest runs in a subprocess on a throwaway test file)."""

import os
import re
import subprocess
import sys

import pytest

from pallas_kernels.testing import SEED_ENV, fresh_seed, relative_error

PROBE = """
import pytest

def test_draws_then_fails(rng):
    print("first draw", int(rng.integers(1 << 62)))
    assert False

@pytest.mark.gpu
def test_needs_a_gpu():
    pass
"""


def _pytest(tmp_path, seed: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != SEED_ENV}
    if seed is not None:
        env[SEED_ENV] = seed
    command = [sys.executable, "-m", "pytest", "-p", "pallas_kernels.testing", "-p", "no:cacheprovider", "-rs",
               str(tmp_path / "test_probe.py")]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # 1 = tests failed
    return result.stdout


def test_failure_report_shows_the_seed_that_replays_it(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    first = _pytest(tmp_path, seed=None)
    hint = re.search(rf"random inputs drawn with seed (\d+); replay: {SEED_ENV}=(\d+) python -m pytest "
                     r"'test_probe.py::test_draws_then_fails'", first)  # fmt: skip
    assert hint and hint.group(1) == hint.group(2), first[-3000:]
    assert "1 failed, 1 skipped" in first and "needs an NVIDIA GPU" in first
    replay = _pytest(tmp_path, seed=hint.group(1))
    draw = re.compile(r"first draw (\d+)")
    assert draw.search(replay).group(1) == draw.search(first).group(1)
    assert f"drawn with seed {hint.group(1)};" in replay


def test_seed_variable_and_relative_error(monkeypatch):
    monkeypatch.setenv(SEED_ENV, "12345")
    assert fresh_seed() == 12345
    monkeypatch.setenv(SEED_ENV, "twelve")
    with pytest.raises(ValueError, match=f"{SEED_ENV}='twelve': expected an integer seed"):
        fresh_seed()
    assert relative_error([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert relative_error([3.0, 5.0], [3.0, 4.0]) == pytest.approx(0.2)
    with pytest.raises(AssertionError, match="the result holds 1 non-finite entries"):
        relative_error([float("nan"), 1.0], [1.0, 1.0])
    with pytest.raises(AssertionError, match=r"shapes differ, \(2,\) vs expected \(2, 1\)"):
        relative_error([1.0, 2.0], [[1.0], [2.0]])
