"""Activation checkpointing policies of a decoder layer, by the name the config uses (`model.remat_policy`)."""

from __future__ import annotations

import jax

POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
REMAT_POLICIES = tuple(POLICIES)
