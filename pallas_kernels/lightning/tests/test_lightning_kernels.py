"""Pallas lightning kernels vs the reference: forward, every gradient, decode.

CPU CI runs the Triton-lowered GPU kernels with `interpret=True` and the Mosaic TPU kernels with
`pltpu.InterpretParams()`, on tiny shapes; the `gpu`-marked test runs the compiled kernels on a real GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lightning import (
    lightning_attention,
    lightning_attention_decode,
    lightning_attention_reference,
    lightning_decode_reference,
    tuning,
)
from pallas_kernels.lightning.tests.lightning_testing import random_inputs
from pallas_kernels.testing import relative_error

SLOW, FAST = 1e-3, 2.0
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _value_and_grads(fn, q, k, v, decay, state, seg, seed, **kwargs):
    """(out, final_state) and d/d(q, k, v, initial_state) of a random projection of both outputs."""
    cot_o = jax.random.normal(jax.random.key(seed), q.shape)
    cot_s = jax.random.normal(jax.random.key(seed + 1), (q.shape[0], q.shape[2], q.shape[3], q.shape[3]))

    def loss(q, k, v, s):
        out, fin = fn(q, k, v, decay, initial_state=s, segment_ids=seg, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * cot_o) + jnp.sum(fin * cot_s), (out, fin)

    if state is None:
        state = jnp.zeros(cot_s.shape, jnp.float32)
    grads, outs = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, state)
    return outs, grads


def _check_against_reference(implementation, dtype, seq, starts, rates, with_state, seed, head_dim=16, **kwargs):
    q, k, v, decay, state, seg = random_inputs(
        seed, 2, seq, len(rates), head_dim, rates=rates, dtype=dtype, with_state=with_state, segment_starts=starts
    )
    (out, fin), grads = _value_and_grads(
        lightning_attention, q, k, v, decay, state, seg, seed, implementation=implementation, **kwargs
    )
    up = lambda x: x.astype(jnp.float32)
    (out_r, fin_r), grads_r = _value_and_grads(
        lightning_attention_reference, up(q), up(k), up(v), decay, state, seg, seed
    )
    assert out.shape == q.shape and out.dtype == dtype and fin.dtype == jnp.float32
    tol = TOLERANCE[dtype]
    names = ["out", "final_state", "dq", "dk", "dv", "d initial_state"]
    for name, got, want in zip(names, (out, fin, *grads), (out_r, fin_r, *grads_r), strict=True):
        assert got.shape == want.shape, name
        err = relative_error(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol} (seed {seed}, {kwargs})"


# (dtype, seq, segment starts, per-head rates, carried state, kernel tuning). Chunk 8 and 8-wide blocks keep the
# interpreted grids tiny. seq 45 = 5 full chunks + a tail of 5 tokens (masked loads / stores); with splits 3 the
# pieces are 16 tokens: [0, 16), [16, 32), [32, 45), so starts at 16 / 32 fall exactly on piece (and chunk)
# boundaries, 12 / 30 inside pieces, and the last piece holds a full chunk and the tail. splits 4 over 37 tokens
# gives 3 pieces (the chunks do not go round). bwd_chunk 16 runs the backward on other chunks than the forward.
TRITON_CASES = [
    (jnp.float32, 45, None, [SLOW, FAST], True, dict(splits=1)),
    (jnp.float32, 45, (16, 21, 40), [SLOW, FAST], True, dict(splits=1)),
    (jnp.float32, 45, (5, 24), [FAST, 0.3], False, dict(splits=2)),
    (jnp.float32, 45, (12, 16, 30, 32), [SLOW, 0.3], True, dict(splits=3, bwd_chunk=16)),
    (jnp.float32, 37, None, [SLOW, SLOW], True, dict(splits=4)),
    (jnp.bfloat16, 45, (16, 21), [SLOW, FAST], True, dict(splits=2)),
]


@pytest.mark.parametrize("dtype,seq,starts,rates,with_state,tuning", TRITON_CASES)
def test_triton_kernel_interpret_matches_reference(dtype, seq, starts, rates, with_state, tuning):
    tuning = dict(dict(chunk=8, bwd_chunk=8, block_v=8, block_k=8, num_warps=4, num_stages=2), **tuning)
    _check_against_reference("pallas_triton_interpret", dtype, seq, starts, rates, with_state, seed=seq, **tuning)


@pytest.mark.parametrize(
    "dtype,starts,rates",
    [(jnp.float32, (128, 140), [SLOW, FAST]), (jnp.bfloat16, None, [FAST, 0.05])],
)
def test_mosaic_tpu_kernel_interpret_matches_reference(dtype, starts, rates):
    # chunk 128 (the TPU kernel's tile); 200 tokens = one full and one padded chunk; a document starts at 128.
    _check_against_reference("pallas_mosaic_tpu_interpret", dtype, 200, starts, rates, True, seed=3)


def test_triton_decode_interpret_matches_reference():
    q, k, v, decay, state, _ = random_inputs(5, 3, 1, 2, 16, rates=[SLOW, FAST])
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    out_r, state_r = lightning_decode_reference(q, k, v, decay, state)
    out, new_state = lightning_attention_decode(
        q, k, v, decay, state + 0.0, implementation="pallas_triton_interpret", block_v=8
    )
    assert out.dtype == q.dtype and new_state.dtype == jnp.float32
    assert relative_error(out, out_r) <= 1e-5
    assert relative_error(new_state, state_r) <= 1e-5


def test_kernels_reject_bad_inputs():
    q, k, v, decay, state, _ = random_inputs(2, 1, 8, 2, 16, rates=[0.1, 0.2])
    run = functools.partial(lightning_attention, implementation="pallas_triton_interpret")
    with pytest.raises(ValueError, match="decay_rate"):
        run(q, k, v, decay[:1])
    with pytest.raises(ValueError, match=r"kernel options \['blockv'\]: unknown"):
        run(q, k, v, decay, blockv=8)
    with pytest.raises(ValueError, match="block_v=24: expected a power of two"):
        run(q, k, v, decay, block_v=24)
    with pytest.raises(ValueError, match="splits=0"):
        run(q, k, v, decay, splits=0)
    with pytest.raises(ValueError, match="head_dim 24"):
        run(*(jnp.zeros((1, 8, 2, 24)),) * 3, decay)
    with pytest.raises(ValueError, match="state: expected float32"):
        lightning_attention_decode(
            q[:, 0], k[:, 0], v[:, 0], decay, state.astype(jnp.bfloat16), implementation="pallas_triton_interpret"
        )


# Every forward kernel configuration the tuning may pick, single pass and split, in bf16; fp32 (exact matmuls:
# FMA loops that take minutes of ptxas for wide blocks) only in the configuration fp32 inputs get.
FIRST = tuning.FORWARD_CONFIGS[0]
GPU_CASES = [
    (jnp.bfloat16, dict(chunk=c.chunk, block_v=c.block_v, num_warps=c.num_warps, num_stages=c.num_stages, splits=s))
    for c in tuning.FORWARD_CONFIGS
    for s in (1, 3)
] + [(jnp.float32, dict(chunk=FIRST.chunk, block_v=FIRST.block_v, splits=s)) for s in (1, 3)]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype,config", GPU_CASES, ids=str)
def test_triton_kernel_on_gpu_matches_reference(dtype, config):
    # 1000 tokens: not a multiple of 64 or 128; documents start on and off chunk / piece boundaries.
    starts, rates = (128, 300, 301, 384, 777), [SLOW, 0.05, 0.5, FAST]
    _check_against_reference("pallas_triton", dtype, 1000, starts, rates, True, seed=11, head_dim=128, **config)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("config", tuning.DECODE_CONFIGS, ids=str)
def test_triton_decode_on_gpu_matches_reference(config):
    q, k, v, decay, state, _ = random_inputs(7, 64, 1, 4, 128, rates=[SLOW, 0.05, 0.5, FAST])
    out_r, state_r = lightning_decode_reference(q[:, 0], k[:, 0], v[:, 0], decay, state)
    out, new_state = lightning_attention_decode(
        q[:, 0], k[:, 0], v[:, 0], decay, state + 0.0, block_v=config.block_v, num_warps=config.num_warps
    )
    assert relative_error(out, out_r) <= 1e-5 and relative_error(new_state, state_r) <= 1e-5
