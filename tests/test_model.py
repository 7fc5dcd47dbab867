"""Whole-model behaviour: NumPy parity, scan vs unrolled, jit vs eager, gradients, caches, configs, counts."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import numpy_ref
from support import jit_forward, numpy_weights, randomize_expert_biases, tiny_config

from pallas_kernels.testing import relative_error
from ring_jax.config import ConfigError, ModelConfig, model_defaults
from ring_jax.model import RingLinearModel, layer_locations, layer_plan


def _model(config, seed=0):
    model = RingLinearModel(config, rngs=nnx.Rngs(seed))
    randomize_expert_biases(model, seed)
    return model


def _tokens(rng, config, batch=2, seq=10):
    return jnp.asarray(rng.integers(0, config.vocab_size, size=(batch, seq)), jnp.int32)


@pytest.fixture(scope="module")
def tiny_model():
    return _model(tiny_config(), seed=3)


def test_layer_plan_covers_pre_cycles_and_tail():
    config = tiny_config()
    plan = layer_plan(config)
    assert plan.pre == (0, 1, 2) and plan.first_cycle_layer == 3 and plan.num_cycles == 2 and plan.post == (9,)
    assert [i for i in range(10) if config.is_softmax_layer(i)] == [2, 5, 8, 9]
    assert layer_locations(config)[4] == ("cycle", 0, 1) and layer_locations(config)[9] == ("post", 0)


@pytest.mark.parametrize(
    ("overrides", "softmax"),
    [({}, [4, 9, 14, 19]), (dict(num_hidden_layers=32, layer_group_size=8), [7, 15, 23, 31])],
)
def test_released_layer_schedules(overrides, softmax):
    section = model_defaults()
    section.update(overrides)
    config = ModelConfig.from_config(section)
    assert [i for i in range(config.num_hidden_layers) if config.is_softmax_layer(i)] == softmax
    assert layer_plan(config).num_cycles == 3


@pytest.mark.parametrize("packed", [False, True])
def test_logits_match_numpy_float64_model(rng, tiny_model, packed):
    config = tiny_model.config
    tokens = _tokens(rng, config, batch=2, seq=9)
    segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]]) if packed else None
    packing = {} if segment_ids is None else {"segment_ids": jnp.asarray(segment_ids)}
    actual = jit_forward(tiny_model)(tokens, **packing).logits
    expected = numpy_ref.model_logits(np.asarray(tokens), numpy_weights(tiny_model), config.to_dict(), segment_ids)
    assert relative_error(actual, expected) < 1e-5


def test_scan_and_unrolled_layers_agree(rng, tiny_model):
    tokens = _tokens(rng, tiny_model.config, seq=13)
    unrolled = _model(tiny_model.config.replace(scan_layers=False), seed=3)
    scanned_out, unrolled_out = jit_forward(tiny_model)(tokens), jit_forward(unrolled)(tokens)
    # Same weights, same math: only XLA's fusion order may differ (fp32 rounding).
    np.testing.assert_allclose(scanned_out.logits, unrolled_out.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(scanned_out.expert_load, unrolled_out.expert_load)


def test_jit_and_eager_agree(rng, tiny_model):
    tokens = _tokens(rng, tiny_model.config, seq=11)
    graphdef, state = nnx.split(tiny_model)

    @jax.jit
    def logits(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    # fp32 both ways; XLA fuses (and so rounds) the jitted program differently: 2e-6 seen on logits of ~0.1.
    np.testing.assert_allclose(logits(state, tokens), tiny_model(tokens), rtol=1e-5, atol=1e-5)


def test_gradients_are_finite_and_reach_every_param(rng, tiny_model):
    tokens = _tokens(rng, tiny_model.config, seq=12)
    graphdef, params, rest = nnx.split(tiny_model, nnx.Param, ...)

    def loss(params, rest):  # copy=True: the forward records expert loads into fresh variables
        out = nnx.merge(graphdef, params, rest, copy=True).forward(tokens[:, :-1])
        logprobs = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)) + out.router_z_loss

    grads = jax.jit(jax.grad(loss))(params, rest)
    for path, grad in nnx.to_flat_state(grads):
        value = np.asarray(grad.get_value())
        assert np.isfinite(value).all(), path
        assert np.abs(value).sum() > 0, f"no gradient reaches {path}"


def test_router_outputs_count_every_token(rng, tiny_model):
    tokens = _tokens(rng, tiny_model.config, batch=3, seq=7)
    out = tiny_model.forward(tokens)
    assert out.expert_load.shape == (tiny_model.config.num_moe_layers, 8)
    np.testing.assert_array_equal(out.expert_load.sum(-1), 3 * 7 * 2)
    from ring_jax.layers.moe import ExpertBias, ExpertLoad

    def owners(kind):  # the router each variable belongs to
        return [path[:-1] for path, _ in nnx.to_flat_state(nnx.state(tiny_model, kind))]

    assert owners(ExpertLoad) == owners(ExpertBias)
    assert sum(float(x.sum()) for x in jax.tree.leaves(nnx.state(tiny_model, ExpertLoad))) == 9 * 3 * 7 * 2


def test_prefill_then_decode_matches_full_forward(rng, tiny_model):
    config = tiny_model.config
    tokens = _tokens(rng, config, batch=2, seq=12)
    forward = jit_forward(tiny_model)
    full = forward(tokens).logits
    cache = tiny_model.init_cache(batch=2, max_length=16)
    prefill = forward(tokens[:, :7], cache=cache)
    logits = [prefill.logits]
    cache = prefill.cache
    for t in range(7, 12):
        step = forward(tokens[:, t : t + 1], cache=cache)
        logits.append(step.logits)
        cache = step.cache
    assert int(cache.length) == 12
    assert relative_error(jnp.concatenate(logits, axis=1), full) < 1e-5


def test_mtp_head_matches_numpy_float64_model(rng):
    """Two chained MTP blocks on packed documents against the float64 reference: block d's logits at position t
    (predicting token t + d + 1) wherever token t + d exists; the training path's lm_head inputs give them too."""
    config = tiny_config(num_nextn_predict_layers=2)
    model = _model(config, seed=int(rng.integers(1 << 30)))
    tokens = _tokens(rng, config, batch=2, seq=9)
    segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]])
    out = jit_forward(model)(tokens, segment_ids=jnp.asarray(segment_ids))
    expected = numpy_ref.mtp_logits(np.asarray(tokens), numpy_weights(model), config.to_dict(), segment_ids)
    assert len(out.mtp_logits) == len(expected) == 2
    # fp32 against float64 through the main stack and an MTP block: typically 1e-6, but a random weight draw can be
    # ill-conditioned (RING_JAX_TEST_SEED=1886197039: 1.4e-5, and the float64 reference itself moves by 4e-5 at the
    # same positions when its weights get fp32-epsilon noise). The bound leaves room for that, not for bugs: a wrong
    # mask, position or block input gives errors above 1e-2.
    for depth, (actual, reference) in enumerate(zip(out.mtp_logits, expected, strict=True), start=1):
        assert relative_error(actual[:, :-depth], reference[:, :-depth]) < 1e-4, depth
    # Without logits (the training path): the lm_head inputs, from which the same logits follow.
    bare = model.forward(tokens, segment_ids=jnp.asarray(segment_ids), compute_logits=False)
    assert bare.logits is None and bare.mtp_logits == () and len(bare.mtp_hidden_states) == 2
    for hidden, logits in zip((bare.hidden_states, *bare.mtp_hidden_states), (out.logits, *out.mtp_logits),
                              strict=True):  # fmt: skip
        assert relative_error(model.lm_head(hidden, out_dtype=jnp.float32), logits) < 1e-5


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (dict(num_key_value_heads=3), "model.num_key_value_heads", "divisible"),
        (dict(layer_group_size=11), "model.layer_group_size", "not compatible with num_hidden_layers"),
        (dict(num_experts=10), "model.n_group", "divisible by n_group"),
        (dict(num_experts_per_tok=5, topk_group=2), "model.num_experts_per_tok", "larger than the 4 experts"),
        (dict(topk_group=5), "model.topk_group", "exceeds n_group"),
        (dict(group_norm_size=3), "model.group_norm_size", "divisible by group_norm_size"),
        (dict(partial_rotary_factor=0.3), "model.partial_rotary_factor", "even integer"),
        (dict(score_function="softmax"), "model.score_function", "sigmoid"),
        (dict(tie_word_embeddings=True), "model.tie_word_embeddings", "not supported"),
        (dict(dtype="float8"), "model.dtype", "must be one of"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "model.rope_scaling", "not supported"),
        (dict(hidden_size=0), "model.hidden_size", "positive integer"),
        (dict(gmm_implementation="megablox"), "model.gmm_implementation", "must be one of"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field, message):
    with pytest.raises(ConfigError, match=rf"^{field}: .*{message}"):
        tiny_config(**overrides)


def test_unknown_and_missing_fields_are_reported():
    section = model_defaults()
    section.unlock() if hasattr(section, "unlock") else None
    values = section.to_dict()
    with pytest.raises(ConfigError, match="model.hiden_size: unknown model field"):
        ModelConfig.from_config({**values, "hiden_size": 3})
    del values["head_dim"]
    with pytest.raises(ConfigError, match="model.head_dim: required model field is missing"):
        ModelConfig.from_config(values)


@pytest.mark.parametrize(
    ("config_file", "expected"),
    [
        ("configs/ring_mini_linear_2.py", (16.42e9, 1.60e9, 0.957e9)),
        ("configs/ring_flash_linear_2.py", (104.18e9, 7.44e9, 6.16e9)),
    ],
)
def test_parameter_counts_match_the_paper(config_file, expected):
    result = subprocess.run(
        [sys.executable, "-m", "ring_jax.params", f"--config={config_file}", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    counts = json.loads(result.stdout)
    assert set(counts) == {"total", "activated", "activated_non_embedding"}
    assert all(isinstance(v, int) for v in counts.values())
    for key, value in zip(("total", "activated", "activated_non_embedding"), expected, strict=True):
        assert counts[key] == pytest.approx(value, rel=2e-3), key


def test_bf16_compute_tracks_fp32(tiny_model):
    """Compute dtype comes from the config; fp32 parameters, bf16 matmuls, fp32 norms/router/state/logits."""
    tokens = _tokens(np.random.default_rng(0), tiny_model.config, seq=16)  # fixed: the tolerance fits its routing
    bf16 = _model(tiny_model.config.replace(dtype="bfloat16"), seed=3)
    out = jit_forward(bf16)(tokens)
    assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
    # 10 layers of bf16 residual stream; a few top-k routing decisions flip, hence more than bf16's 0.4 %.
    assert relative_error(out.logits, jit_forward(tiny_model)(tokens).logits) < 8e-2


@pytest.mark.slow
def test_model_with_pallas_kernels_in_interpret_mode(rng, tiny_model):
    """The GPU (Triton-lowered) lightning kernel inside the model, run by the Pallas interpreter on CPU."""
    tokens = _tokens(rng, tiny_model.config, seq=9)
    kernel_model = _model(tiny_model.config.replace(lightning_implementation="pallas_triton_interpret"), seed=3)
    forward = jit_forward(kernel_model)
    assert relative_error(forward(tokens).logits, jit_forward(tiny_model)(tokens).logits) < 1e-5
    cache = kernel_model.init_cache(batch=2, max_length=12)
    prefill = forward(tokens[:, :8], cache=cache)
    step = forward(tokens[:, 8:], cache=prefill.cache)  # the in-place decode kernel
    assert relative_error(step.logits[:, 0], jit_forward(tiny_model)(tokens).logits[:, 8]) < 1e-5


def test_sharding_rules_fit_any_mesh():
    from jax.sharding import PartitionSpec

    from ring_jax.model import abstract_model
    from ring_jax.sharding import MESH_AXES, fit_spec, make_mesh, state_shardings

    mesh = make_mesh({"data": -1})
    assert mesh.axis_names == MESH_AXES and mesh.shape["data"] == len(jax.devices())
    shardings = state_shardings(nnx.state(abstract_model(tiny_config())), mesh)
    experts = shardings["cycles"]["layers"][0]["mlp"]["experts"]["gate"]
    assert experts.spec == PartitionSpec(None, "expert", "fsdp", "tensor")  # [cycles, E, h, I]
    # Axes that do not divide a dimension are dropped instead of failing at placement.
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 2}
    fake_mesh = type("FakeMesh", (), {"axis_names": MESH_AXES, "shape": sizes})
    assert fit_spec(PartitionSpec("tensor", "fsdp"), (131, 8), fake_mesh) == PartitionSpec(None, "fsdp")
    with pytest.raises(ValueError, match="mesh: axis sizes .* need 64 devices"):
        make_mesh({"data": 64})


def test_padding_does_not_count_in_expert_load(rng, tiny_model):
    tokens = _tokens(rng, tiny_model.config, batch=2, seq=8)
    token_mask = jnp.asarray([[True] * 8, [True] * 5 + [False] * 3])
    out = jit_forward(tiny_model)(tokens, token_mask=token_mask)
    np.testing.assert_array_equal(out.expert_load.sum(-1), 13 * 2)  # 13 real tokens, top-2
    unmasked = jit_forward(tiny_model)(tokens)
    np.testing.assert_array_equal(out.logits, unmasked.logits)  # padding is still routed: outputs unchanged


def test_model_fields_are_declared_once():
    """Defaults, the HF config.json mapping and the README table all come from the ModelConfig declarations."""
    import pathlib

    from ring_jax.config import fields_table_markdown, model_fields
    from ring_jax.convert.hf_config import MODEL_FIELDS

    fields = model_fields()
    assert ModelConfig.from_config(model_defaults()) == ModelConfig()  # defaults = the dataclass defaults
    assert set(model_defaults().to_dict()) == set(fields)
    assert set(MODEL_FIELDS) == {name for name, f in fields.items() if f.metadata["kind"] == "hf"}
    assert {f.metadata["kind"] for f in fields.values()} == {"hf", "architecture", "runtime"}
    runtime = {name for name, f in fields.items() if f.metadata["kind"] == "runtime"}
    assert {"dtype", "param_dtype", "scan_layers", "remat_policy", "gmm_implementation"} <= runtime
    assert set(ModelConfig().architecture()) == set(fields) - runtime
    assert all(f.metadata["doc"] for f in fields.values())
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- model-fields:begin -->\n")[1].split("\n<!-- model-fields:end -->")[0]
    assert block == fields_table_markdown(), "README's model field table is stale: paste fields_table_markdown()"
