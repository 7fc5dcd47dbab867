"""Each layer against the float64 NumPy reference (tests/reference/numpy_ref.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import numpy_ref
from support import tiny_config

from pallas_kernels.attention import causal_attention
from pallas_kernels.gmm import grouped_matmul
from pallas_kernels.gmm.api import GROUPED_MATMUL
from pallas_kernels.lightning.tests.lightning_testing import numpy_recurrence
from pallas_kernels.testing import relative_error
from ring_jax.layers.attention import LayerInputs, SoftmaxAttention
from ring_jax.layers.lightning import LightningAttention, alibi_slopes, layer_decay_rates
from ring_jax.layers.moe import MoE, moe_dispatch_combine, select_experts
from ring_jax.layers.norms import GroupRMSNorm, RMSNorm
from ring_jax.layers.rope import apply_rope, rope_tables

F64 = np.float64


def _inputs(config, positions, segment_ids=None):
    cos, sin = rope_tables(jnp.asarray(positions), config)
    return LayerInputs(cos, sin, None if segment_ids is None else jnp.asarray(segment_ids), 0)


def _segments(rng, batch, seq):
    """Three documents per row, boundaries at random places."""
    ids = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        for cut in sorted(rng.choice(np.arange(1, seq), size=2, replace=False)):
            ids[b, cut:] += 1
    return ids


def _positions(segment_ids):
    positions = np.zeros(segment_ids.shape)
    for b in range(segment_ids.shape[0]):
        for t in range(1, segment_ids.shape[1]):
            positions[b, t] = 0 if segment_ids[b, t] != segment_ids[b, t - 1] else positions[b, t - 1] + 1
    return positions


def test_rope_partial_neox_matches_numpy(rng):
    config = tiny_config(head_dim=16, partial_rotary_factor=0.5, rope_theta=1e6)
    x = rng.normal(size=(2, 11, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 5000, size=(2, 11))
    cos, sin = rope_tables(jnp.asarray(positions), config)
    expected = numpy_ref.rope(x.astype(F64), positions.astype(F64), 1e6, 8)
    assert relative_error(apply_rope(jnp.asarray(x), cos, sin), expected) < 1e-5  # fp32 angles up to 5000 rad
    # The second half of each head passes through untouched.
    np.testing.assert_array_equal(np.asarray(apply_rope(jnp.asarray(x), cos, sin))[..., 8:], x[..., 8:])


def test_rope_scaling_linear_divides_positions(rng):
    plain = tiny_config()
    scaled = tiny_config(rope_scaling={"type": "linear", "factor": 4.0})
    positions = jnp.asarray(rng.integers(0, 400, size=(1, 6)) * 4)
    cos_scaled, _ = rope_tables(positions, scaled)
    cos_plain, _ = rope_tables(positions // 4, plain)
    np.testing.assert_allclose(cos_scaled, cos_plain, atol=1e-5)


def test_qk_rmsnorm_matches_numpy(rng):
    norm = RMSNorm(16, eps=1e-6, param_dtype=jnp.float32, names=("head_dim",))
    norm.scale[...] = rng.normal(size=16).astype(np.float32)
    x = rng.normal(size=(2, 5, 4, 16)).astype(np.float32)
    expected = numpy_ref.rms_norm(x.astype(F64), np.asarray(norm.scale[...], F64), 1e-6)
    assert relative_error(norm(jnp.asarray(x)), expected) < 1e-6


def test_group_rmsnorm_and_sigmoid_gate_match_numpy(rng):
    norm = GroupRMSNorm(32, 4, eps=1e-6, param_dtype=jnp.float32)
    norm.scale[...] = rng.normal(size=32).astype(np.float32)
    o = rng.normal(size=(3, 7, 32)).astype(np.float32) * rng.uniform(0.1, 10, size=(1, 1, 32)).astype(np.float32)
    gate_logits = rng.normal(size=(3, 7, 32)).astype(np.float32)
    actual = norm(jnp.asarray(o)) * jax.nn.sigmoid(jnp.asarray(gate_logits))
    expected = numpy_ref.group_rms_norm(o.astype(F64), np.asarray(norm.scale[...], F64), 4, 1e-6) / (
        1 + np.exp(-gate_logits.astype(F64))
    )
    assert relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("heads", [4, 6, 16, 32])
def test_alibi_slopes_closed_form(heads):
    expected = numpy_ref.alibi_slopes(heads)
    np.testing.assert_allclose(alibi_slopes(heads), expected, rtol=1e-6)
    if heads == 16:  # r = 2^-0.5, last slope 2^-8
        np.testing.assert_allclose(alibi_slopes(16)[[0, 1, -1]], [2**-0.5, 0.5, 2**-8], rtol=1e-6)


def test_layer_decay_matches_spec_example():
    # Mini's head 0 (docs/architecture.md#decay): layer 0 λ = 0.4751 with δ = 1, 0.4931 with δ = 0;
    # layer 18 f = 0.1053 / 0.0526.
    config = tiny_config(num_attention_heads=16, num_key_value_heads=4, head_dim=8, num_hidden_layers=20,
                         layer_group_size=5, group_norm_size=4)  # fmt: skip
    assert np.exp(-layer_decay_rates(config, 0)[0]) == pytest.approx(0.4751, abs=1e-4)
    assert np.exp(-layer_decay_rates(config.replace(decay_layer_offset=0), 0)[0]) == pytest.approx(0.4931, abs=1e-4)
    assert layer_decay_rates(config, 18)[0] / alibi_slopes(16)[0] == pytest.approx(0.1053, abs=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_lightning_layer_matches_numpy_recurrence(rng, packed):
    config = tiny_config()
    layer = LightningAttention(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    layer.out_norm.scale[...] = rng.normal(size=32).astype(np.float32)
    batch, seq = 2, 13
    x = rng.normal(size=(batch, seq, 32)).astype(np.float32)
    segment_ids = _segments(rng, batch, seq) if packed else None
    positions = _positions(segment_ids) if packed else np.tile(np.arange(seq), (batch, 1))
    layer_index = 4
    actual, _ = layer(jnp.asarray(x), _inputs(config, positions, segment_ids), layer_index)

    w = nnx.to_pure_dict(nnx.state(layer))
    f64 = lambda a: np.asarray(a, F64)  # noqa: E731
    qkv = x.astype(F64) @ f64(w["qkv"]["kernel"])
    q, k, v = (a.reshape(batch, seq, 4, 8) for a in np.split(qkv, 3, axis=-1))
    q = numpy_ref.rope(numpy_ref.rms_norm(q, f64(w["qk"]["q_norm"]["scale"]), 1e-6), positions, 1e4, 4)
    k = numpy_ref.rope(numpy_ref.rms_norm(k, f64(w["qk"]["k_norm"]["scale"]), 1e-6), positions, 1e4, 4)
    factor = 1 - (layer_index - 1) / (config.num_hidden_layers - 1) + 1e-5
    o, _ = numpy_recurrence(q, k, v, numpy_ref.alibi_slopes(4) * factor, 8**-0.5, segment_ids=segment_ids)
    o = numpy_ref.group_rms_norm(o.reshape(batch, seq, 32), f64(w["out_norm"]["scale"]), 2, 1e-6)
    gated = o / (1 + np.exp(-(x.astype(F64) @ f64(w["gate"]["kernel"]))))
    assert relative_error(actual, gated @ f64(w["out"]["kernel"])) < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_gqa_attention_layer_matches_numpy(rng, packed):
    config = tiny_config()
    layer = SoftmaxAttention(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    batch, seq = 2, 11
    x = rng.normal(size=(batch, seq, 32)).astype(np.float32)
    segment_ids = _segments(rng, batch, seq) if packed else None
    positions = _positions(segment_ids) if packed else np.tile(np.arange(seq), (batch, 1))
    actual, _ = layer(jnp.asarray(x), _inputs(config, positions, segment_ids))

    w = nnx.to_pure_dict(nnx.state(layer))
    f64 = lambda a: np.asarray(a, F64)  # noqa: E731
    qkv = x.astype(F64) @ f64(w["qkv"]["kernel"])
    q = qkv[..., :32].reshape(batch, seq, 4, 8)
    k = qkv[..., 32:48].reshape(batch, seq, 2, 8)
    v = qkv[..., 48:].reshape(batch, seq, 2, 8)
    q = numpy_ref.rope(numpy_ref.rms_norm(q, f64(w["qk"]["q_norm"]["scale"]), 1e-6), positions, 1e4, 4)
    k = numpy_ref.rope(numpy_ref.rms_norm(k, f64(w["qk"]["k_norm"]["scale"]), 1e-6), positions, 1e4, 4)
    out = numpy_ref.gqa_attention(q, k, v, segment_ids).reshape(batch, seq, 32) @ f64(w["out"]["kernel"])
    assert relative_error(actual, out) < 1e-5


def _route(scores, bias, **overrides):
    config = tiny_config(**overrides)
    weights, experts = select_experts(jnp.asarray(scores, jnp.float32), jnp.asarray(bias, jnp.float32), config)
    return np.asarray(weights), np.asarray(experts)


def test_router_bias_changes_selection_not_weights():
    scores = [[0.9, 0.8, 0.7, 0.1]]
    flat = dict(num_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5)
    weights, experts = _route(scores, [0.0, 0.0, 0.0, 0.0], **flat)
    assert experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(weights, [[2.5 * 0.9 / 1.7, 2.5 * 0.8 / 1.7]], rtol=1e-6)
    # +0.5 on expert 2 moves it into the top-2 (biased 1.2 > 0.9 > 0.8) ...
    weights, experts = _route(scores, [0.0, 0.0, 0.5, 0.0], **flat)
    assert experts.tolist() == [[2, 0]]
    # ... but its weight comes from the unbiased score 0.7: 2.5 · 0.7 / (0.7 + 0.9).
    np.testing.assert_allclose(weights, [[2.5 * 0.7 / 1.6, 2.5 * 0.9 / 1.6]], rtol=1e-6)


def test_router_group_limit_excludes_the_best_expert():
    # Groups of 2: g0 = (0.95, 0.05) sums to 1.0, g1 = 1.2, g2 = 1.1, g3 = 0.2; keeping 2 groups drops g0,
    # so expert 0 (the best single score) is not chosen.
    scores = [[0.95, 0.05, 0.6, 0.6, 0.55, 0.55, 0.1, 0.1]]
    weights, experts = _route(scores, [0.0] * 8, num_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    assert experts.tolist() == [[2, 3]]
    np.testing.assert_allclose(weights, [[1.25, 1.25]], rtol=1e-6)
    # With one group kept the pick is the best pair inside g1 only.
    weights, experts = _route(scores, [0.0] * 8, num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    assert experts.tolist() == [[2, 3]]


def test_router_selection_matches_numpy_on_random_scores(rng):
    config = tiny_config(num_experts=32, n_group=4, topk_group=2, num_experts_per_tok=4)
    scores = rng.uniform(size=(50, 32))
    bias = rng.normal(0, 0.2, size=32)
    weights, experts = select_experts(jnp.asarray(scores, jnp.float32), jnp.asarray(bias, jnp.float32), config)
    expected_experts, expected_weights = numpy_ref.route(scores, bias, 4, 2, 4, 2.5)
    np.testing.assert_array_equal(experts, expected_experts)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)


def test_moe_block_matches_numpy(rng):
    config = tiny_config()
    block = MoE(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    block.router.expert_bias[...] = rng.normal(0, 0.3, size=8).astype(np.float32)
    x = rng.normal(size=(2, 9, 32)).astype(np.float32)
    actual, stats = block(jnp.asarray(x))
    w = jax.tree.map(lambda a: np.asarray(a, F64), nnx.to_pure_dict(nnx.state(block)))
    layer = {
        "router": w["router"]["kernel"], "expert_bias": w["router"]["expert_bias"],
        "expert_gate": w["experts"]["gate"], "expert_up": w["experts"]["up"], "expert_down": w["experts"]["down"],
        "shared_gate": w["shared"]["gate"]["kernel"], "shared_up": w["shared"]["up"]["kernel"],
        "shared_down": w["shared"]["down"]["kernel"],
    }  # fmt: skip
    numpy_cfg = dict(n_group=4, topk_group=2, num_experts_per_tok=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    expected = numpy_ref.moe(x.reshape(18, 32).astype(F64), layer, numpy_cfg).reshape(x.shape)
    assert relative_error(actual, expected) < 1e-5
    assert float(stats.expert_load.sum()) == 18 * 2
    assert np.isfinite(float(stats.z_loss)) and float(stats.z_loss) > 0


ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="GPU only")


@pytest.mark.parametrize(
    ("implementation", "dims", "tolerance"),
    [("ragged_dot", (6, 5), 1e-5), ("reference", (6, 5), 1e-5),
     pytest.param("tokamax", (128, 256), 2e-2, marks=[pytest.mark.gpu, ON_GPU])],
)  # fmt: skip
def test_grouped_matmul_matches_per_group_products(rng, implementation, dims, tolerance):
    """Per-group products, zeros (and zero lhs gradients) for the padding rows past every group."""
    k, n = dims
    group_sizes = np.array([3, 0, 5, 1, 0, 4], np.int32) * (1 if k < 100 else 40)  # empty groups included
    rows = int(group_sizes.sum()) + 2 * (1 if k < 100 else 64)  # trailing rows outside all groups
    lhs = rng.normal(size=(rows, k)).astype(np.float32)
    rhs = rng.normal(size=(6, k, n)).astype(np.float32)
    dtype = jnp.float32 if implementation != "tokamax" else jnp.bfloat16
    args = (jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype), jnp.asarray(group_sizes))
    out = np.asarray(grouped_matmul(*args, implementation=implementation), np.float32)
    grad_lhs = np.asarray(jax.grad(lambda a, *rest: jnp.sum(grouped_matmul(a, *rest, implementation=implementation)
                                                            .astype(jnp.float32)))(*args), np.float32)  # fmt: skip
    start = 0
    for group, size in enumerate(group_sizes):
        expected = lhs[start : start + size] @ rhs[group]
        assert relative_error(out[start : start + size], expected) < tolerance
        start += size
    np.testing.assert_array_equal(out[start:], 0.0)
    np.testing.assert_array_equal(grad_lhs[start:], 0.0)


def test_grouped_matmul_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="grouped_matmul: unknown implementation .cublas."):
        grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]), implementation="cublas")


def dense_moe(x, experts, weights, gate, up, down):
    """Every expert on every token, weighted by a dense [tokens, E] routing matrix: plain autodiff, no sorting."""
    combine = jnp.sum(jax.nn.one_hot(experts, gate.shape[0]) * weights[..., None], axis=1)
    per_expert = jnp.einsum("tei,eih->teh", jax.nn.silu(jnp.einsum("th,ehi->tei", x, gate))
                            * jnp.einsum("th,ehi->tei", x, up), down)  # fmt: skip
    return jnp.einsum("teh,te->th", per_expert, combine)


def test_dispatch_gradients_match_dense_autodiff(rng):
    """The gather-only custom VJPs (permute, unpermute_combine) against autodiff of a dense MoE, fresh inputs,
    with tokens routed to the same expert more than once across the batch and an expert left empty."""
    tokens, hidden, inter, experts_n, top_k = 24, 16, 8, 6, 3
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)
    experts = jnp.asarray(np.stack([rng.choice(experts_n - 1, top_k, replace=False) for _ in range(tokens)]),
                          jnp.int32)  # fmt: skip
    weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(tokens, top_k)), jnp.float32)
    kernels = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in
               [(experts_n, hidden, inter), (experts_n, hidden, inter), (experts_n, inter, hidden)]]  # fmt: skip
    cotangent = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)

    def loss(fn, x, weights, *kernels):
        return jnp.sum(fn(x, experts, weights, *kernels) * cotangent)

    ours = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(moe_dispatch_combine, x, weights, *kernels)
    dense = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(dense_moe, x, weights, *kernels)
    for name, a, b in zip(("x", "weights", "gate", "up", "down"), ours, dense, strict=True):
        assert relative_error(a, b) < 1e-5, name
    np.testing.assert_array_equal(np.asarray(ours[4][-1]), 0.0)  # the unused expert gets no gradient


def test_dispatch_implementations_agree_with_gradients(rng):
    tokens, hidden, inter, experts_n, top_k = 12, 8, 6, 4, 2
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)
    experts = jnp.asarray(np.stack([rng.choice(experts_n, top_k, replace=False) for _ in range(tokens)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(tokens, top_k)), jnp.float32)
    kernels = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in
               [(experts_n, hidden, inter), (experts_n, hidden, inter), (experts_n, inter, hidden)]]  # fmt: skip

    def loss(implementation, x, weights, *kernels):
        return jnp.sum(moe_dispatch_combine(x, experts, weights, *kernels, implementation=implementation) ** 2)

    grads = {impl: jax.grad(loss, argnums=(1, 2, 3, 4, 5))(impl, x, weights, *kernels)
             for impl in ("ragged_dot", "reference")}  # fmt: skip
    for a, b in zip(grads["ragged_dot"], grads["reference"], strict=True):
        assert relative_error(a, b) < 1e-5
    # And the forward against a per-token loop.
    out = moe_dispatch_combine(x, experts, weights, *kernels)
    k = [np.asarray(t, F64) for t in kernels]
    expected = np.stack([
        sum(float(weights[t, i]) * numpy_ref.swiglu(np.asarray(x[t], F64), k[0][e], k[1][e], k[2][e])
            for i, e in enumerate(np.asarray(experts[t])))
        for t in range(tokens)
    ])  # fmt: skip
    assert relative_error(out, expected) < 1e-5


def test_platform_defaults_on_cpu_and_unknown_names(rng):
    """On CPU: the grouped matmul defaults to XLA's ragged_dot, attention None is XLA's; unknown names are refused.
    (Kernel tuning off the GPU: pallas_kernels/gmm/tests/test_tuning.py.)"""
    assert GROUPED_MATMUL.select(None) == "ragged_dot"
    q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.repeat([[1] * 5 + [2] * 7], 2, axis=0), jnp.int32)
    for kwargs in (dict(), dict(segment_ids=segments)):
        np.testing.assert_array_equal(causal_attention(q, k, v, **kwargs),
                                      causal_attention(q, k, v, implementation="xla", **kwargs))  # fmt: skip
    # A packed row is two independent documents: the second one's outputs ignore the first one's tokens.
    packed = causal_attention(q, k, v, segment_ids=segments)
    alone = causal_attention(q[:, 5:], k[:, 5:], v[:, 5:])
    assert relative_error(packed[:, 5:], alone) < 1e-5
    with pytest.raises(ValueError, match="causal_attention: unknown implementation 'flash'"):
        causal_attention(q, k, v, implementation="flash")
