"""Pure-jnp grouped matmul: each row multiplies the weight of the group it falls in (exact, O(groups) work)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """Group index of each row [num_rows] for rows sorted by group; rows past sum(group_sizes) get num_groups."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(num_rows), side="right")


def grouped_matmul_reference(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type: jnp.dtype | None = None
) -> jax.Array:
    """lhs [rows, k] (rows sorted by group), rhs [groups, k, n], group_sizes [groups] -> [rows, n].

    Rows beyond sum(group_sizes) give zeros, as `jax.lax.ragged_dot` does.
    """
    groups = row_groups(group_sizes, lhs.shape[0])
    out_dtype = preferred_element_type or lhs.dtype

    def add_group(out: jax.Array, group: jax.Array) -> tuple[jax.Array, None]:
        product = jnp.dot(lhs, rhs[group], preferred_element_type=jnp.float32)
        return out + jnp.where((groups == group)[:, None], product, 0.0), None

    init = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    out, _ = jax.lax.scan(add_group, init, jnp.arange(rhs.shape[0]))
    return out.astype(out_dtype)
