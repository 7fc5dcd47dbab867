"""Lightning references: chunked == recurrent == float64 NumPy; gradients, jit, decode, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import (
    lightning_attention,
    lightning_attention_decode,
    lightning_attention_recurrent,
    lightning_attention_reference,
    lightning_decode_reference,
)
from pallas_kernels.lightning.tests.lightning_testing import numpy_recurrence, random_inputs
from pallas_kernels.testing import relative_error

SLOW, FAST = 1e-3, 2.0
# (seq, chunk, segment starts): odd length; a document starting exactly at a chunk boundary (16 = 2*8) and one
# inside a chunk; a chunk larger than the sequence.
CASES = [
    (37, 8, None),
    (37, 8, (16, 21)),
    (29, 16, (3, 8, 9)),
    (5, 64, (2,)),
]


@pytest.mark.parametrize("rate", [SLOW, FAST, "mixed"])
@pytest.mark.parametrize("seq,chunk,starts", CASES)
def test_chunked_matches_recurrent_and_numpy(seq, chunk, starts, rate):
    rates = [SLOW, FAST, 0.3] if rate == "mixed" else [rate] * 3
    q, k, v, decay, state, seg = random_inputs(seq * 7 + chunk, 2, seq, 3, 8, rates=rates, segment_starts=starts)
    out_c, fin_c = lightning_attention_reference(q, k, v, decay, initial_state=state, segment_ids=seg, chunk_size=chunk)
    out_r, fin_r = lightning_attention_recurrent(q, k, v, decay, initial_state=state, segment_ids=seg)
    out_n, fin_n = numpy_recurrence(q, k, v, decay, 8**-0.5, state, None if seg is None else np.asarray(seg))
    assert out_c.shape == q.shape and out_c.dtype == q.dtype
    assert fin_c.shape == (2, 3, 8, 8) and fin_c.dtype == jnp.float32
    assert relative_error(out_c, out_r) <= 1e-5
    assert relative_error(fin_c, fin_r) <= 1e-5
    assert relative_error(out_c, out_n) <= 1e-5
    assert relative_error(fin_c, fin_n) <= 1e-5
    assert relative_error(out_r, out_n) <= 1e-5


def test_no_initial_state_and_custom_scale():
    q, k, v, decay, _, _ = random_inputs(3, 1, 19, 2, 8, rates=[0.1, 0.7], with_state=False)
    out_c, fin_c = lightning_attention_reference(q, k, v, decay, scale=0.37, chunk_size=8)
    out_n, fin_n = numpy_recurrence(q, k, v, decay, 0.37)
    assert relative_error(out_c, out_n) <= 1e-5
    assert relative_error(fin_c, fin_n) <= 1e-5


@pytest.mark.parametrize("rate", [SLOW, FAST])
def test_gradients_chunked_match_recurrent(rate):
    q, k, v, decay, state, seg = random_inputs(11, 2, 21, 2, 8, rates=[rate, rate * 0.5], segment_starts=(8, 13))
    cot_o, cot_s = (
        jax.random.normal(jax.random.key(5), q.shape),
        jax.random.normal(jax.random.key(6), state.shape),
    )

    def loss(fn, **kw):
        def f(q, k, v, s):
            o, fs = fn(q, k, v, decay, initial_state=s, segment_ids=seg, **kw)
            return jnp.sum(o * cot_o) + jnp.sum(fs * cot_s)

        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, state)

    grads_c = loss(lightning_attention_reference, chunk_size=8)
    grads_r = loss(lightning_attention_recurrent)
    for name, gc, gr in zip(["q", "k", "v", "initial_state"], grads_c, grads_r, strict=True):
        assert relative_error(gc, gr) <= 1e-5, name


def test_jit_matches_eager():
    q, k, v, decay, state, seg = random_inputs(21, 2, 23, 2, 8, rates=[SLOW, FAST], segment_starts=(8,))
    fn = lambda q, k, v, s, seg: lightning_attention_reference(
        q, k, v, decay, initial_state=s, segment_ids=seg, chunk_size=8
    )
    eager = fn(q, k, v, state, seg)
    jitted = jax.jit(fn)(q, k, v, state, seg)
    for a, b in zip(eager, jitted, strict=True):
        assert relative_error(a, b) <= 1e-6


def test_bf16_inputs_keep_dtype_and_fp32_state():
    q, k, v, decay, state, _ = random_inputs(4, 1, 16, 2, 8, rates=[0.2, 0.9], dtype=jnp.bfloat16)
    out, fin = lightning_attention_reference(q, k, v, decay, initial_state=state, chunk_size=8)
    assert out.dtype == jnp.bfloat16 and fin.dtype == jnp.float32
    out_n, fin_n = numpy_recurrence(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), decay, 8**-0.5, state
    )
    assert relative_error(out, out_n) <= 1e-2
    assert relative_error(fin, fin_n) <= 1e-5


def test_decode_reference_matches_recurrence_steps():
    q, k, v, decay, state, _ = random_inputs(8, 3, 4, 2, 8, rates=[SLOW, FAST])
    s = state
    outs = []
    for t in range(4):
        o, s = lightning_decode_reference(q[:, t], k[:, t], v[:, t], decay, s)
        outs.append(o)
    out_n, fin_n = numpy_recurrence(q, k, v, decay, 8**-0.5, state)
    assert relative_error(jnp.stack(outs, 1), out_n) <= 1e-5
    assert relative_error(s, fin_n) <= 1e-5
    o_api, s_api = lightning_attention_decode(q[:, 0], k[:, 0], v[:, 0], decay, state, implementation="reference")
    o_ref, s_ref = lightning_decode_reference(q[:, 0], k[:, 0], v[:, 0], decay, state)
    np.testing.assert_array_equal(o_api, o_ref)
    np.testing.assert_array_equal(s_api, s_ref)


def test_api_dispatch_and_errors():
    q, k, v, decay, state, seg = random_inputs(9, 1, 10, 2, 8, rates=[0.5, 1.0], segment_starts=(4,))
    out_default, _ = lightning_attention(q, k, v, decay, initial_state=state, segment_ids=seg)
    out_rec, _ = lightning_attention(q, k, v, decay, initial_state=state, segment_ids=seg, implementation="recurrent")
    assert relative_error(out_default, out_rec) <= 1e-5
    with pytest.raises(ValueError, match="^lightning_attention: unknown implementation 'nope'; choose from"):
        lightning_attention(q, k, v, decay, implementation="nope")
    with pytest.raises(ValueError, match="decay_rate"):
        lightning_attention(q, k, v, decay[:1])
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, decay, initial_state=state[:, :1])
    with pytest.raises(ValueError, match="segment_ids"):
        lightning_attention(q, k, v, decay, segment_ids=seg[:, :3])
    with pytest.raises(ValueError, match="^k:"):
        lightning_attention(q, k[:, :3], v, decay)
    with pytest.raises(ValueError, match="state"):
        lightning_attention_decode(q[:, 0], k[:, 0], v[:, 0], decay, state[:, :, :4])
