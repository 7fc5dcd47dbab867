"""Shared input checks and layout helpers for the lightning attention op.

Shapes: q, k, v [batch, seq, heads, head_dim]; decay_rate [heads];
state [batch, heads, head_dim, head_dim] fp32; segment_ids [batch, seq] int.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def validate_inputs(q, k, v, decay_rate, initial_state=None, segment_ids=None) -> None:
    """Raises ValueError naming the offending tensor when shapes do not fit the op's contract."""
    if q.ndim != 4:
        raise ValueError(f"q: expected [batch, seq, heads, head_dim], got shape {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name}: shape {x.shape} must equal q's shape {q.shape}")
    batch, seq, heads, head_dim = q.shape
    if seq == 0:
        raise ValueError("q: sequence length must be positive")
    if decay_rate.shape != (heads,):
        raise ValueError(f"decay_rate: expected shape ({heads},) = [heads], got {decay_rate.shape}")
    if initial_state is not None and initial_state.shape != (batch, heads, head_dim, head_dim):
        raise ValueError(
            "initial_state: expected [batch, heads, head_dim, head_dim] = "
            f"{(batch, heads, head_dim, head_dim)}, got {initial_state.shape}"
        )
    if segment_ids is not None:
        if segment_ids.shape != (batch, seq):
            raise ValueError(f"segment_ids: expected [batch, seq] = {(batch, seq)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")


def validate_decode_inputs(q, k, v, decay_rate, state) -> None:
    if q.ndim != 3:
        raise ValueError(f"q: expected [batch, heads, head_dim], got shape {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name}: shape {x.shape} must equal q's shape {q.shape}")
    batch, heads, head_dim = q.shape
    if decay_rate.shape != (heads,):
        raise ValueError(f"decay_rate: expected shape ({heads},) = [heads], got {decay_rate.shape}")
    if state.shape != (batch, heads, head_dim, head_dim):
        raise ValueError(
            f"state: expected [batch, heads, head_dim, head_dim] = {(batch, heads, head_dim, head_dim)}, "
            f"got {state.shape}"
        )


def default_scale(head_dim: int, scale: float | None) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def document_index(segment_ids: jax.Array | None, batch: int, seq: int) -> jax.Array:
    """[batch, seq] int32, non-decreasing: +1 at each token whose segment id differs from the previous one.

    Document 0 is the one the initial state flows into. Monotonicity lets kernels test "same document" by <=.
    """
    if segment_ids is None:
        return jnp.zeros((batch, seq), jnp.int32)
    starts = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)],
        axis=1,
    )
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def pad_to_multiple(x: jax.Array, axis: int, multiple: int, *, edge: bool = False) -> jax.Array:
    """Pads `axis` up to a multiple of `multiple` with zeros (edge=True: repeats of the last entry)."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode="edge" if edge else "constant")


def kernel_vjp(forward_call, backward_call):
    """Wraps a kernel pair into a custom_vjp op f(q, k, v, rate, doc, s0, cfg) -> (out, final_state).

    forward_call(q, k, v, rate, doc, s0, cfg) -> (out, final_state);
    backward_call(q, k, v, rate, doc, s0, do, dfinal_state, cfg) -> (dq, dk, dv, ds0).
    `rate` (decay) and `doc` (document index) get no gradient; q, k, v and s0 are saved as residuals and the
    state is recomputed in the backward pass.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def op(q, k, v, rate, doc, s0, cfg):
        return forward_call(q, k, v, rate, doc, s0, cfg)

    def fwd(q, k, v, rate, doc, s0, cfg):
        return forward_call(q, k, v, rate, doc, s0, cfg), (q, k, v, rate, doc, s0)

    def bwd(cfg, residuals, cotangents):
        q, k, v, rate, doc, s0 = residuals
        do, dsf = cotangents
        dq, dk, dv, ds0 = backward_call(q, k, v, rate, doc, s0, do.astype(q.dtype), dsf, cfg)
        return dq, dk, dv, None, None, ds0

    op.defvjp(fwd, bwd)
    return op
