"""`grouped_matmul(..., implementation=)`: the one entry point the MoE layer calls.

Implementations: "ragged_dot" (XLA `jax.lax.ragged_dot`: good on TPU and CPU, slow on GPU), "reference" (pure jnp,
for tests), "tokamax" (`tokamax.ragged_dot` pinned to its Mosaic GPU / TPU kernels, when installed: pinned so that an
unsupported case fails loudly instead of silently falling back to XLA's dense-masked GPU path, which is 100x slower).
Faster kernels with their own custom VJPs plug in here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gmm.reference import grouped_matmul_reference

IMPLEMENTATIONS = ("ragged_dot", "reference", "tokamax")


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str = "ragged_dot",
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """lhs [rows, k] sorted by group, rhs [groups, k, n], group_sizes [groups] int32 -> [rows, n]."""
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
    if implementation == "reference":
        return grouped_matmul_reference(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
    if implementation == "tokamax":
        import tokamax

        return tokamax.ragged_dot(
            lhs, rhs, group_sizes, preferred_element_type=preferred_element_type, implementation="mosaic"
        )
    raise ValueError(f"unknown grouped_matmul implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
