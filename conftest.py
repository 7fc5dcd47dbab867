"""Loads the test support shared by both test trees (`tests/`, `pallas_kernels/**/tests`): the `seed` and `rng`
fixtures and the skipping of `gpu` tests off the GPU (see `pallas_kernels/testing.py`).

Compilation is most of the suite's time on CPU (tiny models, many distinct programs), so the session
- keeps a persistent XLA compilation cache in a fresh temporary directory (removed at the end): many tests build the
  same tiny train state and step, and the cache returns the executable that compiling the same program would give;
- compiles with LLVM's optimisation level 0 (`XLA_FLAGS`), 2-3x faster to compile; the tiny programs run as fast.
Both reach child processes (CLI runs, the 8-device and 2-process tests) through the environment. A cache directory
the caller already set in `JAX_COMPILATION_CACHE_DIR` is used as is and kept.
"""

import os
import shutil
import tempfile

import jax

pytest_plugins = ["pallas_kernels.testing"]

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
MIN_COMPILE_SECONDS = "0.5"  # smaller programs compile faster than they are read back
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_owned_cache_dir = None


def pytest_configure(config) -> None:
    global _owned_cache_dir
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # read when the backend starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
    if not os.environ.get(CACHE_VARIABLE):
        _owned_cache_dir = tempfile.mkdtemp(prefix="ring_jax_test_xla_cache_")
        os.environ[CACHE_VARIABLE] = _owned_cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))  # fmt: skip


def pytest_unconfigure(config) -> None:
    if _owned_cache_dir is not None:
        shutil.rmtree(_owned_cache_dir, ignore_errors=True)
