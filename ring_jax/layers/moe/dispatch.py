"""Dropless MoE dispatch: sort token copies by expert, grouped matmuls, unsort, weighted combine.

Pure functions of arrays (no module state): expert parallelism (`parallel.py`) runs them inside `jax.shard_map`
with a token exchange around the grouped matmuls.

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


def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """out[r] = x[index[r]], or a zero row where index[r] == len(x): a one-to-one row move (a permutation, or
    packing rows into padded buckets and back), differentiated by a gather too.

    x [n, h]; index [m] int32 in [0, n]; inverse [n] int32: the out row that holds x row i (every x row appears in
    `out` at most once; m means "nowhere", its gradient is zero). Returns [m, h].
    """
    return _take_rows(x, index, inverse)


@jax.custom_vjp
def _take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    return padded[index]


def _take_rows_fwd(x, index, inverse):
    return _take_rows(x, index, inverse), (index, inverse)


def _take_rows_bwd(residuals, grad):
    index, inverse = residuals
    return _take_rows(grad, inverse, index), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def expert_mlp(
    sorted_x: jax.Array,
    group_sizes: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    implementation: str | None = None,
    fp8: str = "none",
) -> jax.Array:
    """SwiGLU of each row with its group's expert: sorted_x [rows, hidden] grouped by expert (rows past
    sum(group_sizes) are padding and give zeros); gate_up [E, hidden, 2 * inter] (gate ‖ up), down [E, inter,
    hidden], in `weight_dtype(x.dtype, ...)`. `implementation` picks the grouped matmul; with fp8 "emulated" /
    "native" both run in blockwise FP8 instead (pallas_kernels.fp8). Returns [rows, hidden]."""
    inter = down.shape[1]

    def gmm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        if fp8 == "none":
            return grouped_matmul(lhs, rhs, group_sizes, implementation=implementation)
        return blockwise_grouped_matmul(lhs, rhs, group_sizes, implementation=fp8_implementation(fp8))

    gate_up_out = gmm(sorted_x, gate_up)
    return gmm(jax.nn.silu(gate_up_out[:, :inter]) * gate_up_out[:, inter:], down)


def weight_dtype(compute_dtype: jnp.dtype, param_dtype: jnp.dtype, fp8: str) -> jnp.dtype:
    """The dtype the expert GEMMs take their weights in: the compute dtype, or with FP8 the parameter dtype itself
    (quantised directly, so the gradient comes back in the parameter dtype)."""
    return compute_dtype if fp8 == "none" else param_dtype


def fuse_gate_up(gate_kernel: jax.Array, up_kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[E, hidden, inter] x 2 -> [E, hidden, 2 * inter] in `dtype`: one grouped matmul of width 2·inter instead of
    two; the concatenation rides on the cast to the compute dtype that the weights need anyway."""
    return jnp.concatenate([gate_kernel, up_kernel], axis=-1).astype(dtype)


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
    """y_t = Σ_i weights[t, i] · SwiGLU_{experts[t, i]}(x_t), every expert on this device.

    x [tokens, hidden]; experts, weights [tokens, top_k]; gate_kernel, up_kernel [E, hidden, inter];
    down_kernel [E, inter, hidden]. Returns [tokens, hidden] in x's dtype. `implementation`, `fp8`: see
    `expert_mlp`.
    """
    dtype = weight_dtype(x.dtype, gate_kernel.dtype, fp8)
    gate_up = fuse_gate_up(gate_kernel, up_kernel, dtype)
    return dispatch_combine(x, experts, weights, gate_up, down_kernel.astype(dtype), implementation=implementation,
                            fp8=fp8)  # fmt: skip


def dispatch_combine(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    implementation: str | None = None,
    fp8: str = "none",
) -> jax.Array:
    """`moe_dispatch_combine` with the kernels already fused and cast (`fuse_gate_up`): gate_up [E, hidden,
    2 * inter], down [E, inter, hidden]; experts [tokens, top_k] in [0, E]: id E (or more) marks a copy handled
    elsewhere, which contributes zero."""
    num_experts, top_k = gate_up.shape[0], experts.shape[1]
    routing = sort_by_expert(experts, num_experts + 1)
    sorted_x = permute(x, routing.order, routing.inverse, top_k)
    sorted_out = expert_mlp(sorted_x, routing.group_sizes[:num_experts], gate_up, down,
                            implementation=implementation, fp8=fp8)  # fmt: skip
    return unpermute_combine(sorted_out, weights, routing.order, routing.inverse)
