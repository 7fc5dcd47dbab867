"""Fixtures and hooks shared by both test trees (`tests/` and `pallas_kernels/**/tests`)."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.testing import fresh_seed, replay_hint


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
