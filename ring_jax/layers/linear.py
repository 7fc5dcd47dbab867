"""Projection and embedding modules with logical sharding names on their weights."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.fp8 import blockwise_matmul
from pallas_kernels.fp8.api import BLOCKWISE_FP8
from ring_jax.sharding import LogicalNames, annotated, per_shard

DEFAULT_INIT = nnx.initializers.normal(stddev=0.02)


# Ring-mini-shaped training step on one H200 (BENCHMARKS.md, 2026-12-01): FP8 route -> speed as a fraction of bf16's.
# Routes not listed are not measured at least as fast as bf16.
_GPU_STEP_SPEED = {"pallas_mosaic_gpu": 1.26}


def fp8_implementation(fp8: str) -> str | None:
    """The `pallas_kernels.fp8` implementation of a `model.fp8` mode: "emulated" -> "reference", "native" -> None
    (the platform's order), a kernel route's name -> itself.

    On a GPU it warns when the route that runs is not the one measured faster than bf16 (Mosaic GPU, on Hopper):
    every route matches the recipe (checked against the float64 recipe on an H200), not every one is fast."""
    if fp8 == "emulated":
        return "reference"
    implementation = None if fp8 == "native" else fp8
    if jax.default_backend() == "gpu":
        route = BLOCKWISE_FP8.select(implementation)
        if _GPU_STEP_SPEED.get(route, 0.0) < 1.0:
            fastest = ", ".join(f"{name} {speed}x" for name, speed in _GPU_STEP_SPEED.items())
            warnings.warn(f"model.fp8={fp8!r} runs {route}, not measured faster than bf16 on GPU ({fastest} bf16's "
                          "training step on an H200, BENCHMARKS.md); its numerics are the FP8 recipe's",
                          stacklevel=2)  # fmt: skip
    return implementation


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    names: LogicalNames,
    dtype: jnp.dtype,
    init: nnx.Initializer = DEFAULT_INIT,
) -> nnx.Param:
    """A trainable weight carrying its logical axis names (mapped to mesh axes by `ring_jax.sharding`)."""
    return annotated(nnx.Param, init(rngs.params(), shape, dtype), names)


class Linear(nnx.Module):
    """y = x @ kernel, no bias. kernel [in_features, out_features] (HF stores the transpose).

    fp8 ("none", "emulated", "native"): multiply in blockwise FP8 (pallas_kernels.fp8), quantising the fp32 / bf16
    kernel itself, so its gradient comes back in the parameter dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: LogicalNames,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        fp8: str = "none",
    ):
        self.kernel = param(rngs, (in_features, out_features), names, param_dtype)
        self.dtype = dtype
        self.fp8 = fp8

    def __call__(self, x: jax.Array, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """x [..., in] -> [..., out]; `out_dtype` asks for a wider result (fp32 logits) without upcasting inputs."""
        if self.fp8 != "none":
            return self._fp8_matmul(x.astype(self.dtype), self.kernel[...]).astype(out_dtype or self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        return jnp.dot(x.astype(self.dtype), kernel, preferred_element_type=out_dtype).astype(out_dtype or self.dtype)


    def _fp8_matmul(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The FP8 kernel runs on each device's rows (`per_shard`) with the whole weight (gathered like an FSDP
        weight; a tensor-parallel split of the weight is not kept for FP8 layers)."""
        rows = ("activation_batch", *(None,) * (x.ndim - 1))
        implementation = fp8_implementation(self.fp8)
        matmul = per_shard(lambda x, w: blockwise_matmul(x, w, implementation=implementation),
                           in_names=(rows, None), out_names=rows)  # fmt: skip
        return matmul(x, kernel)


class Embed(nnx.Module):
    """Token embedding table [vocab, hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab_size, hidden_size), ("vocab", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, seq] int -> [batch, seq, hidden]."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
