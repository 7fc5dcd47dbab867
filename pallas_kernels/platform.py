"""What the default backend offers: used by the ops' `implementation=None` choices."""

from __future__ import annotations

import functools
import importlib.util

import jax


@functools.cache
def tokamax_on_gpu() -> bool:
    """True on a GPU backend with tokamax installed (the `gpu` extra)."""
    return jax.default_backend() == "gpu" and importlib.util.find_spec("tokamax") is not None
