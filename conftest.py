"""Loads the test support shared by both test trees (`tests/`, `pallas_kernels/**/tests`): the `seed` and `rng`
fixtures and the skipping of `gpu` tests off the GPU (see `pallas_kernels/testing.py`)."""

pytest_plugins = ["pallas_kernels.testing"]
