"""`grouped_matmul(..., implementation=)`: the one entry point the MoE layer calls (see `pallas_kernels.dispatch`).

Implementations: "tokamax" (tokamax's Mosaic kernels, GPU / TPU, with the `gpu` extra), "ragged_dot" (XLA), and
"reference" (pure jnp, for tests). None tries, per platform: GPU "tokamax" then "ragged_dot"; TPU and CPU
"ragged_dot".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import Implementation, Op, at_default_precision, with_package

GROUPED_MATMUL = Op(
    "grouped_matmul",
    "pallas_kernels.gmm",
    {
        "tokamax": Implementation("tokamax_mosaic:grouped_matmul_tokamax",
                                  available=at_default_precision(with_package("tokamax", "gpu", "tpu"))),
        "ragged_dot": Implementation("xla:grouped_matmul_ragged_dot"),
        "reference": Implementation("reference:grouped_matmul_reference"),
    },
    {"gpu": ("tokamax", "ragged_dot"), "tpu": ("ragged_dot",), "cpu": ("ragged_dot",)},
)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """lhs [rows, k] sorted by group, rhs [groups, k, n], group_sizes [groups] int32 -> [rows, n].

    Rows past sum(group_sizes) (padding) give zeros."""
    fn = GROUPED_MATMUL.resolve(implementation)
    return fn(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
