"""Expert parallelism: the routed experts of an MoE layer on a device mesh, inside one `jax.shard_map`.

Inside the shard_map every mesh axis is manual. A device holds its batch shard of the tokens (rows split over the
batch axes, `data` × `fsdp` × `expert`, and the same on every `tensor` rank) with their routing, and the weights of
E / ep experts (`expert` axis, size ep), each with its hidden dimension split over `fsdp` (gathered here, FSDP
style: the gather's transpose reduce-scatters the gradients) and its inner width over `tensor` (each rank computes
a slice of SwiGLU; the partial outputs are summed over `tensor` at the end). The router, expert bias, shared expert
and expert-load statistics stay outside (the loads are global sums already).

How token copies reach the devices that hold their experts (`model.expert_parallel_transport`); all are dropless:

- "all_gather": gather the tokens of the `expert` group, let each device apply its own experts to every copy
  routed to them, then reduce-scatter the sums back. Moves (ep − 1) token rows per token each way.
- "all_to_all": send each copy to its expert's device with a fixed-capacity `all_to_all` (buffers sized for the
  worst case, every copy to one device, so nothing is dropped), run the local experts, send the results back.
  Runs everywhere (XLA:CPU included); its buffers, and the bytes it moves, grow with ep.
- "ragged_all_to_all": the same exchange with `jax.lax.ragged_all_to_all`, which moves only the real rows
  (GPU and TPU; XLA:CPU cannot run it). Moves top_k · (ep − 1) / ep rows per token each way.

With top_k = 8, "all_gather" moves fewer bytes for ep < 8. None picks "all_gather" for ep < top_k, else
"ragged_all_to_all" on GPU / TPU and "all_to_all" on CPU. When the tokens are not split over `expert` (a batch too
small to divide), every device applies its experts to the same tokens and the outputs are summed over `expert`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ring_jax.config import ModelConfig
from ring_jax.layers.moe.dispatch import (
    dispatch_combine,
    expert_mlp,
    fuse_gate_up,
    moe_dispatch_combine,
    permute,
    sort_by_expert,
    take_rows,
    unpermute_combine,
    weight_dtype,
)
from ring_jax.sharding import dividing_axes, fit_spec, logical_to_mesh_spec

EXPERT = "expert"
GATE_UP_NAMES = ("expert", "embed", "expert_mlp")  # [E, hidden, inter], as the parameters are annotated
DOWN_NAMES = ("expert", "expert_mlp", "embed")  # [E, inter, hidden]


def choose_transport(requested: str | None, ep: int, top_k: int) -> str:
    """The transport that runs (see the module docstring)."""
    if requested is not None:
        return requested
    if ep < top_k:
        return "all_gather"
    return "all_to_all" if jax.default_backend() == "cpu" else "ragged_all_to_all"


def routed_experts(
    tokens: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    gate_kernel: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    config: ModelConfig,
) -> jax.Array:
    """y_t = Σ_i weights[t, i] · SwiGLU_{experts[t, i]}(tokens_t) on the current mesh (one device: no shard_map).

    tokens [tokens, hidden] (compute dtype); experts, weights [tokens, top_k]; gate_kernel, up_kernel
    [E, hidden, inter]; down_kernel [E, inter, hidden]. Returns [tokens, hidden] in the tokens' dtype.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return moe_dispatch_combine(tokens, experts, weights, gate_kernel, up_kernel, down_kernel,
                                    implementation=config.gmm_implementation, fp8=config.fp8)  # fmt: skip
    gate_spec = fit_spec(logical_to_mesh_spec(GATE_UP_NAMES), gate_kernel.shape, mesh)
    down_spec = fit_spec(logical_to_mesh_spec(DOWN_NAMES), down_kernel.shape, mesh)
    token_axes = dividing_axes("activation_batch", (tokens.shape[0],), mesh)
    token_spec = PartitionSpec(token_axes or None, None)
    ep = mesh.shape[EXPERT] if gate_spec[0] == EXPERT else 1
    transport = choose_transport(config.expert_parallel_transport, ep, config.num_experts_per_tok)
    gather_axes = lambda spec_entry: tuple(a for a in _as_tuple(spec_entry) if mesh.shape[a] > 1)  # noqa: E731

    def body(x, experts, weights, gate, up, down):
        dtype = weight_dtype(x.dtype, gate.dtype, config.fp8)
        gate_up, down = fuse_gate_up(gate, up, dtype), down.astype(dtype)
        for axis in gather_axes(gate_spec[1]):  # FSDP: the full hidden dimension of this device's experts
            gate_up = jax.lax.all_gather(gate_up, axis, axis=1, tiled=True)
            down = jax.lax.all_gather(down, axis, axis=2, tiled=True)
        local = dict(gate_up=gate_up, down=down, implementation=config.gmm_implementation, fp8=config.fp8)
        if ep == 1:
            y = dispatch_combine(x, experts, weights, **local)
        elif EXPERT not in token_axes:  # same tokens on every expert rank: each adds its experts' share
            y = jax.lax.psum(_apply_local_experts(x, experts, weights, **local), EXPERT)
        elif transport == "all_gather":
            gathered = [jax.lax.all_gather(a, EXPERT, axis=0, tiled=True) for a in (x, experts, weights)]
            y = jax.lax.psum_scatter(_apply_local_experts(*gathered, **local), EXPERT, scatter_dimension=0,
                                     tiled=True)  # fmt: skip
        else:
            y = _exchange(x, experts, weights, ep=ep, ragged=transport == "ragged_all_to_all", **local)
        for axis in gather_axes(gate_spec[2]):  # tensor-parallel expert width: partial sums
            y = jax.lax.psum(y, axis)
        return y

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, gate_spec, gate_spec, down_spec),
        out_specs=token_spec,
        check_vma=False,
    )(tokens, experts, weights, gate_kernel, up_kernel, down_kernel)


def _apply_local_experts(x, experts, weights, *, gate_up, down, implementation, fp8):
    """Σ over the copies routed to this device's experts only (experts: global ids); copies of other devices'
    experts contribute zeros."""
    local_count = gate_up.shape[0]
    first = jax.lax.axis_index(EXPERT) * local_count
    local_ids = jnp.where((experts >= first) & (experts < first + local_count), experts - first, local_count)
    return dispatch_combine(x, local_ids, weights, gate_up, down, implementation=implementation, fp8=fp8)


def _exchange(x, experts, weights, *, ep, ragged, gate_up, down, implementation, fp8):
    """Sends every copy to the device of its expert, applies the local experts there, and brings the results back
    (fixed-capacity `all_to_all`, or `ragged_all_to_all` when `ragged`)."""
    tokens, top_k = experts.shape
    copies, hidden = tokens * top_k, x.shape[1]
    local_count = gate_up.shape[0]
    routing = sort_by_expert(experts, local_count * ep)  # by global expert id, hence by destination device
    sorted_x = permute(x, routing.order, routing.inverse, top_k)  # [copies, hidden]
    per_destination = routing.group_sizes.reshape(ep, local_count)  # my copies per (device, its local expert)
    send = per_destination.sum(axis=1)  # [ep]
    send_start = jnp.cumsum(send) - send
    received_counts = jax.lax.all_to_all(per_destination, EXPERT, 0, 0, tiled=True)  # [ep (source), local]
    received_rows = received_counts.sum(axis=1)
    local = dict(gate_up=gate_up, down=down, implementation=implementation, fp8=fp8)
    if ragged:
        me = jax.lax.axis_index(EXPERT)
        counts = jax.lax.all_gather(send, EXPERT)  # [sender, receiver]
        lands_at = (jnp.cumsum(counts, axis=0) - counts)[me]  # where my slice starts in each receiver's buffer
        recv_start = jnp.cumsum(received_rows) - received_rows
        buffer = jnp.zeros((ep * copies, hidden), x.dtype)  # worst case: every device sends me all its copies
        received = jax.lax.ragged_all_to_all(sorted_x, buffer, send_start, send, lands_at, received_rows,
                                             axis_name=EXPERT)  # fmt: skip
        out = _local_experts_on_segments(received, recv_start, received_counts, **local)
        came_from = (jnp.cumsum(counts, axis=1) - counts)[:, me]  # where each sender's slice to me started
        sorted_out = jax.lax.ragged_all_to_all(out, jnp.zeros_like(sorted_x), recv_start, received_rows, came_from,
                                               send, axis_name=EXPERT)  # fmt: skip
    else:
        slot = jnp.arange(copies)
        destination = jnp.searchsorted(jnp.cumsum(send), slot, side="right")
        bucket_of_copy = destination * copies + slot - send_start[destination]  # [copies] flat slot in [ep * copies]
        filled = slot[None, :] < send[:, None]  # [ep, copies]
        copy_of_bucket = jnp.where(filled, send_start[:, None] + slot[None, :], copies).reshape(-1)
        buckets = take_rows(sorted_x, copy_of_bucket, bucket_of_copy).reshape(ep, copies, hidden)
        received = jax.lax.all_to_all(buckets, EXPERT, 0, 0, tiled=True).reshape(ep * copies, hidden)
        out = _local_experts_on_segments(received, jnp.arange(ep) * copies, received_counts, **local)
        returned = jax.lax.all_to_all(out.reshape(ep, copies, hidden), EXPERT, 0, 0, tiled=True)
        sorted_out = take_rows(returned.reshape(ep * copies, hidden), bucket_of_copy, copy_of_bucket)
    return unpermute_combine(sorted_out, weights, routing.order, routing.inverse)


def _local_experts_on_segments(rows, segment_start, segment_counts, *, gate_up, down, implementation, fp8):
    """rows [R, hidden] hold one segment per source device, starting at segment_start [ep], each sorted by local
    expert with segment_counts [ep, local] rows per expert; rows outside every segment are padding. Returns the
    expert outputs [R, hidden] in the same layout (zeros for padding)."""
    local_count = segment_counts.shape[1]
    index = jnp.arange(rows.shape[0])
    segment = jnp.sum(index[:, None] >= segment_start[None, 1:], axis=1)  # [R]
    within = index - segment_start[segment]
    ends = jnp.cumsum(segment_counts, axis=1)[segment]  # [R, local]
    expert = jnp.sum(within[:, None] >= ends, axis=1)  # local_count past the segment's rows: padding
    routing = sort_by_expert(expert[:, None], local_count + 1)
    grouped = take_rows(rows, routing.order, routing.inverse)
    out = expert_mlp(grouped, routing.group_sizes[:local_count], gate_up, down, implementation=implementation,
                     fp8=fp8)  # fmt: skip
    return take_rows(out, routing.inverse, routing.order)


def _as_tuple(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())
