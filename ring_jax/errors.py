"""The one base class of ring_jax's user-facing errors.

Every error a user can cause with bad input (a config value, a data file, a checkpoint, a token id) derives from
`RingJaxError` and carries a one-line message that starts with what is wrong (the field, file or tensor), so that
entry points (`train.py`, the `python -m ring_jax.*` tools) print that line instead of a traceback.
"""

from __future__ import annotations


class RingJaxError(ValueError):
    """Bad input to ring_jax; the message names the field, file or tensor at fault."""


class ConfigError(RingJaxError):
    """An invalid configuration value; the message starts with the dotted field name."""
