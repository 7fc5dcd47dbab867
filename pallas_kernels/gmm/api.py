"""`grouped_matmul(..., implementation=)`: the one entry point the MoE layer calls.

Implementations: "ragged_dot" (XLA `jax.lax.ragged_dot`: good on TPU and CPU; on GPU it materialises a dense masked
product, ~100x slower), "reference" (pure jnp, for tests), "tokamax" (`tokamax.ragged_dot` pinned to its Mosaic
GPU / TPU kernels: an unsupported case fails loudly instead of silently falling back to XLA's dense GPU path).
None picks per platform: "tokamax" on GPU when it is installed (the `gpu` extra), else "ragged_dot".
Faster kernels with their own custom VJPs plug in here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gmm.reference import grouped_matmul_reference
from pallas_kernels.platform import tokamax_on_gpu

IMPLEMENTATIONS = (None, "ragged_dot", "reference", "tokamax")


def default_implementation() -> str:
    """The implementation None resolves to on the default backend."""
    return "tokamax" if tokamax_on_gpu() else "ragged_dot"


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """lhs [rows, k] sorted by group, rhs [groups, k, n], group_sizes [groups] int32 -> [rows, n]."""
    if implementation is None:
        implementation = default_implementation()
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
