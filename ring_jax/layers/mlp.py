"""SwiGLU feed-forward: down(silu(gate(x)) ⊙ up(x)), no biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.layers.linear import Linear


class SwiGLU(nnx.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        fp8: str = "none",
    ):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, fp8=fp8)
        self.gate = Linear(hidden_size, intermediate_size, names=("embed", "mlp"), **kwargs)
        self.up = Linear(hidden_size, intermediate_size, names=("embed", "mlp"), **kwargs)
        self.down = Linear(intermediate_size, hidden_size, names=("mlp", "embed"), **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., hidden] -> [..., hidden]."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
