"""The data pipeline's error type."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing training data; the message names the config field or file (and line)."""
