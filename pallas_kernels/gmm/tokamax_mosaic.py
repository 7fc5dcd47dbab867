"""Grouped matmul through tokamax's Mosaic kernels (GPU Hopper, TPU), pinned so that an unsupported case raises
instead of silently falling back to XLA's dense GPU path. Per-shape kernel configs: `pallas_kernels.gmm.tuning`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROW_TILE = 64  # tokamax's Mosaic kernel takes a row count below this or a multiple of it


def grouped_matmul_tokamax(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type: jnp.dtype | None = None
) -> jax.Array:
    """lhs [rows, k] sorted by group, rhs [groups, k, n], group_sizes [groups] -> [rows, n].

    tokamax leaves the rows past sum(group_sizes) (padding: expert-parallel receive buffers, copies handled on
    another device, the rows added here to reach a multiple of ROW_TILE) uninitialised, in the product and in its
    gradient with respect to lhs. The op's contract is zeros there, so both ends are masked: the output rows, and
    (through the mask on lhs) their gradients.
    """
    import tokamax

    rows = lhs.shape[0]
    extra = -rows % ROW_TILE if rows > ROW_TILE else 0
    real = (jnp.arange(rows + extra) < jnp.sum(group_sizes))[:, None]
    padded = jnp.pad(lhs, ((0, extra), (0, 0)))
    out = tokamax.ragged_dot(jnp.where(real, padded, 0), rhs, group_sizes,
                             preferred_element_type=preferred_element_type, implementation="mosaic")  # fmt: skip
    return jnp.where(real, out, 0)[:rows]
