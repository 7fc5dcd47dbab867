"""Grouped matmul through tokamax's Mosaic kernels (GPU Hopper, TPU), pinned so that an unsupported case raises
instead of silently falling back to XLA's dense GPU path. Per-shape kernel configs: `pallas_kernels.gmm.tuning`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_tokamax(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type: jnp.dtype | None = None
) -> jax.Array:
    """lhs [rows, k] sorted by group, rhs [groups, k, n], group_sizes [groups] -> [rows, n].

    tokamax leaves the rows past sum(group_sizes) (padding: expert-parallel receive buffers, copies handled on
    another device) uninitialised, in the product and in its gradient with respect to lhs. The op's contract is
    zeros there, so both ends are masked: the output rows, and (through the mask on lhs) their gradients.
    """
    import tokamax

    real = (jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes))[:, None]
    out = tokamax.ragged_dot(jnp.where(real, lhs, 0), rhs, group_sizes, preferred_element_type=preferred_element_type,
                             implementation="mosaic")  # fmt: skip
    return jnp.where(real, out, 0)
