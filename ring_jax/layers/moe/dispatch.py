"""Dropless MoE dispatch: sort token copies by expert, grouped matmuls, unsort, weighted combine.

A pure function of arrays (no module state) so that expert parallelism can later run it inside `jax.shard_map`
with an all-to-all around it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import grouped_matmul


def moe_dispatch_combine(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    gate_kernel: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    *,
    implementation: str = "ragged_dot",
) -> jax.Array:
    """y_t = Σ_i weights[t, i] · SwiGLU_{experts[t, i]}(x_t).

    x [tokens, hidden]; experts, weights [tokens, top_k]; gate_kernel, up_kernel [E, hidden, inter];
    down_kernel [E, inter, hidden]. Returns [tokens, hidden] in x's dtype.
    """
    tokens, top_k = experts.shape
    num_experts = gate_kernel.shape[0]
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)  # token copies grouped by expert
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    sorted_x = x[order // top_k]

    def gmm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return grouped_matmul(lhs, rhs.astype(lhs.dtype), group_sizes, implementation=implementation)

    hidden = jax.nn.silu(gmm(sorted_x, gate_kernel)) * gmm(sorted_x, up_kernel)
    sorted_out = gmm(hidden, down_kernel)
    expert_out = jnp.zeros_like(sorted_out).at[order].set(sorted_out).reshape(tokens, top_k, -1)
    combined = jnp.einsum("tkh,tk->th", expert_out.astype(jnp.float32), weights.astype(jnp.float32))
    return combined.astype(x.dtype)
