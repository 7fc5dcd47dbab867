"""Test support shared by every test of the repository (the kernel tests under `pallas_kernels/**/tests` and the
model tests under `tests/`), as a pytest plugin that the repository-root `conftest.py` loads:

- `relative_error`, the accuracy measure of every numerical test;
- the `seed` and `rng` fixtures: fresh random inputs on every run, the seed shown in a failing test's report, and
  $RING_JAX_TEST_SEED to draw the same inputs again;
- tests marked `gpu` are skipped, with the reason, where JAX's backend is not a GPU.

Nothing in the kernels imports this module.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
import pytest

SEED_ENV = "RING_JAX_TEST_SEED"  # set to a reported seed to replay a failing test with the same random inputs


def relative_error(actual: Any, expected: Any) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius norms, float64; the denominator floored at 1e-30).

    Non-finite values fail here, with a message saying which side holds them, instead of comparing as NaN.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    for name, value in (("result", actual), ("expected value", expected)):
        if not np.all(np.isfinite(value)):
            raise AssertionError(f"relative_error: the {name} holds {np.size(value) - np.isfinite(value).sum()} "
                                 f"non-finite entries")  # fmt: skip
    if actual.shape != expected.shape:
        raise AssertionError(f"relative_error: shapes differ, {actual.shape} vs expected {expected.shape}")
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def fresh_seed() -> int:
    """The seed of one test's random inputs: $RING_JAX_TEST_SEED when set (replaying a failure), else a new one, so
    that every run draws new inputs."""
    value = os.environ.get(SEED_ENV)
    if value is None:
        return secrets.randbits(32)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={value!r}: expected an integer seed") from None


def replay_hint(seed: int, nodeid: str) -> str:
    """The line a failing test's report shows: its seed and the command that draws the same inputs again."""
    return f"random inputs drawn with seed {seed}; replay: {SEED_ENV}={seed} python -m pytest '{nodeid}'"


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A new seed for each test (or $RING_JAX_TEST_SEED); a failing test's report shows it in a "seed" section."""
    value = fresh_seed()
    request.node.add_report_section("setup", "seed", replay_hint(value, request.node.nodeid))
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    """NumPy generator for a test's random inputs, seeded by the `seed` fixture."""
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped, with the reason, where JAX's backend is not a GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import jax  # only when a gpu test was collected: this initialises the backend

    backend = jax.default_backend()
    if backend != "gpu":
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU (JAX backend here: {backend})")
        for item in gpu_items:
            item.add_marker(skip)
