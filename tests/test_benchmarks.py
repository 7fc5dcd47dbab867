"""What the benchmarks time: a fwd+bwd measurement must run the forward GEMM (XLA deletes work whose result is
unused, which silently turns a fwd+bwd timing into a backward-only one)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from benchmarks.fp8 import fwd_bwd_step


def _dots(fn, *args) -> int:
    return len(re.findall(r" dot\(", fn.lower(*args).compile().as_text()))


def test_fwd_bwd_step_keeps_the_forward_gemm():
    x, w, cotangent = jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((64, 16))
    backward_only = jax.jit(lambda x, w, ct: jax.vjp(jnp.dot, x, w)[1](ct))
    assert _dots(backward_only, x, w, cotangent) == 2  # the trap: y = x w is dead code here
    assert _dots(fwd_bwd_step(jnp.dot), x, w, cotangent) == 3  # y, dx, dw
