"""Dropless MoE dispatch: sort token copies by expert, grouped matmuls, unsort, weighted combine.

Pure functions of arrays (no module state) so that expert parallelism can later run them inside `jax.shard_map`
with an all-to-all around the grouped matmuls.

The permutations are gathers in both directions: the backward of "copy token t to its k sorted slots" is "gather
the k slots back and add", not a scatter-add, and the combine's backward is again a gather by the sort order.
Autodiff of `x[order // k]` would give a scatter-add into [tokens, hidden] with k-fold collisions, which runs on
GPU atomics; the explicit gathers keep every step a plain, fusible read.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fp8 import blockwise_grouped_matmul
from pallas_kernels.gmm import grouped_matmul
from ring_jax.layers.linear import fp8_implementation


class ExpertSort(NamedTuple):
    """The routing of token copies, sorted by expert.

    order [tokens * top_k] int32: sorted slot j holds copy order[j] = t * top_k + i (token t, choice i);
    inverse [tokens * top_k] int32: the sorted slot of copy t * top_k + i; group_sizes [num_experts] int32.
    """

    order: jax.Array
    inverse: jax.Array
    group_sizes: jax.Array


def sort_by_expert(experts: jax.Array, num_experts: int) -> ExpertSort:
    """experts [tokens, top_k] int -> ExpertSort (stable: copies of one expert keep token order)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    slots = jnp.arange(flat.shape[0], dtype=jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(slots, unique_indices=True)
    return ExpertSort(order, inverse, expert_counts(experts, num_experts).astype(jnp.int32))


def expert_counts(experts: jax.Array, num_experts: int, token_weights: jax.Array | None = None) -> jax.Array:
    """experts [tokens, top_k] int, token_weights [tokens] (default 1) -> [num_experts] fp32 weighted counts.

    A compare-and-sum reduction rather than a scatter-add: thousands of copies land on a handful of experts, and
    GPU atomics on so few addresses serialise.
    """
    hits = (experts[..., None] == jnp.arange(num_experts, dtype=experts.dtype)).astype(jnp.float32)
    if token_weights is not None:
        hits = hits * token_weights[:, None, None]
    return jnp.sum(hits, axis=(0, 1))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array, top_k: int) -> jax.Array:
    """x [tokens, hidden] -> [tokens * top_k, hidden]: sorted slot j holds x[order[j] // top_k]."""
    return x[order // top_k]


def _permute_fwd(x, order, inverse, top_k):
    return permute(x, order, inverse, top_k), inverse


def _permute_bwd(top_k, inverse, grad):
    per_copy = grad[inverse].reshape(-1, top_k, grad.shape[-1])  # [tokens, top_k, hidden]
    grad_x = jnp.sum(per_copy.astype(jnp.float32), axis=1).astype(grad.dtype)
    return grad_x, None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute_combine(sorted_out: jax.Array, weights: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """sorted_out [tokens * top_k, hidden] (expert order), weights [tokens, top_k] -> [tokens, hidden]:
    y_t = Σ_i weights[t, i] · sorted_out[inverse[t * top_k + i]], summed in fp32."""
    tokens, top_k = weights.shape
    per_copy = sorted_out[inverse].reshape(tokens, top_k, -1).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", per_copy, weights.astype(jnp.float32)).astype(sorted_out.dtype)


def _unpermute_combine_fwd(sorted_out, weights, order, inverse):
    return unpermute_combine(sorted_out, weights, order, inverse), (sorted_out, weights, order, inverse)


def _unpermute_combine_bwd(residuals, grad):
    sorted_out, weights, order, inverse = residuals
    tokens, top_k = weights.shape
    token_of_slot = order // top_k
    slot_weight = weights.reshape(-1)[order].astype(jnp.float32)
    grad_sorted = (grad[token_of_slot].astype(jnp.float32) * slot_weight[:, None]).astype(sorted_out.dtype)
    per_copy = sorted_out[inverse].reshape(tokens, top_k, -1).astype(jnp.float32)
    grad_weights = jnp.einsum("tkh,th->tk", per_copy, grad.astype(jnp.float32)).astype(weights.dtype)
    return grad_sorted, grad_weights, None, None


unpermute_combine.defvjp(_unpermute_combine_fwd, _unpermute_combine_bwd)


def moe_dispatch_combine(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    gate_kernel: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    *,
    implementation: str | None = None,
    fp8: str = "none",
) -> jax.Array:
    """y_t = Σ_i weights[t, i] · SwiGLU_{experts[t, i]}(x_t).

    x [tokens, hidden]; experts, weights [tokens, top_k]; gate_kernel, up_kernel [E, hidden, inter];
    down_kernel [E, inter, hidden]. Returns [tokens, hidden] in x's dtype. `implementation` picks the grouped
    matmul; with fp8 "emulated" / "native" both expert GEMMs run in blockwise FP8 instead (pallas_kernels.fp8),
    quantising the parameter-dtype weights directly.
    """
    top_k, inter = experts.shape[1], gate_kernel.shape[-1]
    routing = sort_by_expert(experts, gate_kernel.shape[0])
    sorted_x = permute(x, routing.order, routing.inverse, top_k)
    weight_dtype = x.dtype if fp8 == "none" else gate_kernel.dtype

    def gmm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        if fp8 == "none":
            return grouped_matmul(lhs, rhs, routing.group_sizes, implementation=implementation)
        return blockwise_grouped_matmul(lhs, rhs, routing.group_sizes, implementation=fp8_implementation(fp8))

    # One grouped matmul of width 2·inter instead of two: the concatenation rides on the cast to the compute dtype
    # that the weights need anyway (measured: 0.87x the time of two separate ones on an H100).
    gate_up = jnp.concatenate([gate_kernel, up_kernel], axis=-1).astype(weight_dtype)
    gate_up_out = gmm(sorted_x, gate_up)
    hidden = jax.nn.silu(gate_up_out[:, :inter]) * gate_up_out[:, inter:]
    sorted_out = gmm(hidden, down_kernel.astype(weight_dtype))
    return unpermute_combine(sorted_out, weights, routing.order, routing.inverse)
