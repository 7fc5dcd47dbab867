"""Pallas lightning kernels vs the reference: forward, every gradient, decode.

CPU CI runs the Triton-lowered GPU kernels with `interpret=True` and the Mosaic TPU kernels with
`pltpu.InterpretParams()`, on tiny shapes; the `gpu`-marked test runs the compiled kernels on a real GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import (
    lightning_attention,
    lightning_attention_decode,
    lightning_attention_reference,
    lightning_decode_reference,
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


def _check_against_reference(implementation, dtype, seq, starts, rates, with_state, seed, **kwargs):
    q, k, v, decay, state, seg = random_inputs(
        seed, 2, seq, len(rates), 16, rates=rates, dtype=dtype, with_state=with_state, segment_starts=starts
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
    assert relative_error(out, out_r) <= tol
    assert relative_error(fin, fin_r) <= tol
    for name, g, g_r in zip(["q", "k", "v", "initial_state"], grads, grads_r, strict=True):
        assert g.shape == g_r.shape, name
        assert relative_error(g, g_r) <= tol, name


# (dtype, seq, segment starts, per-head rates, carried state, kernel tuning). Chunk 8 / 16-wide blocks keep the
# interpreted grids tiny; seq 45 is not a multiple of the chunk; starts at 16 / 24 fall exactly on chunk (and,
# with splits=4 over 48 padded tokens, piece) boundaries.
TRITON_CASES = [
    (jnp.float32, 45, None, [SLOW, FAST], True, dict(splits=1)),
    (jnp.float32, 45, (16, 21, 40), [SLOW, FAST], True, dict(splits=1)),
    (jnp.float32, 45, (5, 24), [FAST, 0.3], False, dict(splits=1)),
    (jnp.float32, 45, (12, 24, 30), [SLOW, FAST], True, dict(splits=4, chunk=4)),
    (jnp.float32, 37, None, [SLOW, SLOW], True, dict(splits=2)),
    (jnp.bfloat16, 45, (16, 21), [SLOW, FAST], True, dict(splits=1)),
]


@pytest.mark.parametrize("dtype,seq,starts,rates,with_state,tuning", TRITON_CASES)
def test_triton_kernel_interpret_matches_reference(dtype, seq, starts, rates, with_state, tuning):
    tuning = dict(dict(chunk=8, block_v=8, block_k=8), **tuning)
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
    with pytest.raises(ValueError, match="decay_rate"):
        lightning_attention(q, k, v, decay[:1], implementation="pallas_triton_interpret")
    with pytest.raises(ValueError, match="state: expected float32"):
        lightning_attention_decode(
            q[:, 0], k[:, 0], v[:, 0], decay, state.astype(jnp.bfloat16), implementation="pallas_triton_interpret"
        )


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_kernel_on_gpu_matches_reference(dtype):
    _check_against_reference("pallas_triton", dtype, 1000, (128, 300, 301, 777), [SLOW, 0.05, 0.5, FAST], True,
                             seed=11)
    q, k, v, decay, state, _ = random_inputs(7, 64, 1, 4, 128, rates=[SLOW, 0.05, 0.5, FAST])
    out_r, state_r = lightning_decode_reference(q[:, 0], k[:, 0], v[:, 0], decay, state)
    out, new_state = lightning_attention_decode(q[:, 0], k[:, 0], v[:, 0], decay, state + 0.0)
    assert relative_error(out, out_r) <= 1e-5 and relative_error(new_state, state_r) <= 1e-5
    np.testing.assert_array_equal(np.isfinite(np.asarray(new_state)), True)
