"""The data pipeline's error type."""

from __future__ import annotations

from ring_jax.errors import RingJaxError


class DataError(RingJaxError):
    """Bad or missing training data; the message names the config field or file (and line)."""
