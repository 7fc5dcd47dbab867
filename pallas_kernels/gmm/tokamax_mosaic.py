"""Grouped matmul through tokamax's Mosaic kernels (GPU Hopper, TPU), pinned so that an unsupported case raises
instead of silently falling back to XLA's dense GPU path. Per-shape kernel configs: `pallas_kernels.gmm.tuning`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_tokamax(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type: jnp.dtype | None = None
) -> jax.Array:
    """lhs [rows, k] sorted by group, rhs [groups, k, n], group_sizes [groups] -> [rows, n]."""
    import tokamax

    return tokamax.ragged_dot(
        lhs, rhs, group_sizes, preferred_element_type=preferred_element_type, implementation="mosaic"
    )
