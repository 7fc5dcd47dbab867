"""What the benchmarks time: a fwd+bwd measurement must run the forward GEMM (XLA deletes work whose result is
unused, which silently turns a fwd+bwd timing into a backward-only one); the vendor comparison must hand cuBLAS the
same quantised operands."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.fp8 import fwd_bwd_step, torch_operands
from pallas_kernels.fp8 import reference


def _dots(fn, *args) -> int:
    return len(re.findall(r" dot\(", fn.lower(*args).compile().as_text()))


def test_fwd_bwd_step_keeps_the_forward_gemm():
    x, w, cotangent = jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((64, 16))
    backward_only = jax.jit(lambda x, w, ct: jax.vjp(jnp.dot, x, w)[1](ct))
    assert _dots(backward_only, x, w, cotangent) == 2  # the trap: y = x w is dead code here
    assert _dots(fwd_bwd_step(jnp.dot), x, w, cotangent) == 3  # y, dx, dw


@pytest.mark.parametrize("weight", [True, False], ids=["128x128 weight", "1x128 both"])
def test_torch_operands_are_the_layouts_cublas_blockwise_takes(weight):
    """benchmarks/fp8.py hands our quantised operands to cuBLASLt's blockwise FP8 GEMM (torch._scaled_mm): the
    scales must have the shapes and strides it takes, and (a * scale_a) @ (b * scale_b) must be our product."""
    torch = pytest.importorskip("torch")
    m, c, n = 256, 384, 640
    e4m3 = jnp.float8_e4m3fn
    keys = jax.random.split(jax.random.key(7), 2)
    a = reference.quantize_rows(jax.random.normal(keys[0], (m, c)), e4m3, False)
    if weight:  # y = x w: w [c, n] in 128 x 128 blocks
        b = reference.quantize_blocks(jax.random.normal(keys[1], (c, n)), e4m3, False).input_side()
    else:  # dw = x^T dy: both operands per line and 128-wide block
        b = reference.quantize_rows(jax.random.normal(keys[1], (n, c)), e4m3, False)
    mat_a, mat_b, scale_a, scale_b = torch_operands(a, b)
    assert (mat_a.dtype, mat_b.dtype) == (torch.float8_e4m3fn, torch.float8_e4m3fn)
    assert (mat_a.shape, mat_b.shape) == ((m, c), (c, n)) and mat_b.stride() == (1, c)
    assert scale_a.shape == (m, c // 128) and scale_a.stride() == (1, m)  # M the fast dimension
    if weight:
        assert scale_b.shape == (c // 128, n // 128) and scale_b.stride() == (1, c // 128)
        line_block = 128
    else:
        assert scale_b.shape == (c // 128, n) and scale_b.stride() == (n, 1)
        line_block = 1
    a_f32 = mat_a.float() * scale_a.repeat_interleave(128, dim=1)
    b_f32 = mat_b.float() * scale_b.repeat_interleave(128, dim=0).repeat_interleave(line_block, dim=1)
    ours = reference.dequantize(a) @ reference.dequantize(b).T
    np.testing.assert_allclose((a_f32 @ b_f32).numpy(), np.asarray(ours), rtol=1e-5, atol=1e-4)
