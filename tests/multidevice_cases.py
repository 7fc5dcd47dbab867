"""Sharded training on 8 virtual CPU devices equals one device (run by tests/test_multidevice.py in a process started
with `--xla_force_host_platform_device_count=8`; not collected on its own: the main test process has one device).

Every case runs the real train step (`make_train_step`) of a tiny fp32 model once on one device and once on a
mesh, from the same initial state and batch: the loss, the gradients (read off an SGD step with learning rate 1:
params_before − params_after) and one AdamW step must agree to 1e-5 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pallas_kernels.testing import relative_error
from ring_jax.config import ModelConfig
from ring_jax.layers.moe import MoE
from ring_jax.sharding import make_mesh
from ring_jax.train.config import base_config
from ring_jax.train.optim import make_optimizer
from ring_jax.train.state import StateFactory
from ring_jax.train.step import make_train_step

TOLERANCE = 1e-5
SGD = optax.scale_by_schedule(lambda count: -1.0)  # params -= grads (keeps the step count the metrics read)
MESHES = {
    "data=8": dict(data=8),
    "fsdp=8": dict(fsdp=8),
    "expert=8": dict(expert=8),
    "data=2,expert=4": dict(data=2, expert=4),
    "fsdp=2,tensor=2,expert=2": dict(fsdp=2, tensor=2, expert=2),
}


def tiny_config(**model_overrides):
    config = base_config()
    config.model.update(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, layer_group_size=2, first_k_dense_replace=0,
        num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, group_norm_size=2, intermediate_size=48, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16, num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        rope_theta=10000.0, max_position_embeddings=64, scan_layers=True,
    )  # fmt: skip
    config.model.update(model_overrides)
    config.train.update(batch_size=8, seq_len=16, steps=10, loss_chunk_size=24)
    config.optim.update(learning_rate=1e-2, warmup_steps=0, bias_update_rate=1e-2)
    return config


def random_batch(seed: int, config) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch, seq = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    # Two documents in some rows (segment change mid-row) and padding at the end of one row.
    segments = np.ones((batch, seq), np.int32)
    segments[1, seq // 2 :] = 2
    segments[2, seq - 3 :] = 0
    starts = np.concatenate([np.ones((batch, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    index = np.arange(seq)[None]
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": positions.astype(np.int32), "loss_mask": (segments > 0).astype(np.float32)}  # fmt: skip


def one_step(config, mesh_sizes, tx, batch, devices, initial=None):
    """Runs one train step from a fresh state (around `initial` = (params, expert bias) on the host when given, so
    that each mesh skips the init compile); returns (metrics, params before, params after, expert bias after)."""
    model_config = ModelConfig.from_config(config.model)
    mesh = make_mesh(mesh_sizes, devices, use_all=True)
    factory = StateFactory(model_config, tx, mesh, seed=3)
    train_step = make_train_step(factory, config)
    with jax.set_mesh(mesh):
        state = factory.init() if initial is None else factory.from_params(*initial)
        before = jax.device_get(state.params)
        state, metrics = train_step(state, jax.device_put(batch, factory.batch_sharding()))
        return jax.device_get((metrics, before, state.params, state.expert_bias))


def flat(state: nnx.State) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(state)}


def assert_trees_close(actual: nnx.State, expected: nnx.State, what: str) -> None:
    """Relative error of the whole tree (all leaves as one vector) <= TOLERANCE, and of every leaf <= 10x that
    (a leaf of tiny values sums in a different order on a mesh: fp32 rounding, not a bug, shows there first)."""
    actual, expected = flat(actual), flat(expected)
    assert actual.keys() == expected.keys(), what
    keys = sorted(actual)
    whole = relative_error(np.concatenate([actual[k].ravel() for k in keys]),
                           np.concatenate([expected[k].ravel() for k in keys]))  # fmt: skip
    assert whole <= TOLERANCE, f"{what}: relative error {whole:.2e}"
    for path in keys:
        error = relative_error(actual[path], expected[path])
        assert error <= 10 * TOLERANCE, f"{what} {'/'.join(map(str, path))}: relative error {error:.2e}"


@pytest.fixture(scope="module")
def reference():
    """One device: the initial params and expert biases (host), the batch, an SGD step and an AdamW step."""
    assert jax.device_count() == 8, "run through tests/test_multidevice.py (8 virtual CPU devices)"
    config = tiny_config()
    factory = StateFactory(ModelConfig.from_config(config.model), SGD, make_mesh({}, jax.devices()[:1]), seed=3)
    rng = np.random.default_rng(3)  # random host values for the abstract state (compiling the init is slow on CPU)
    normal = lambda scale: lambda leaf: (scale * rng.normal(size=leaf.shape)).astype(leaf.dtype)  # noqa: E731
    params = jax.tree.map(normal(0.2), factory.abstract_state.params)
    params = jax.tree.map(lambda p: 1.0 + p if p.ndim == 1 else p, params)  # norm scales near 1
    initial = (params, jax.tree.map(normal(0.05), factory.abstract_state.expert_bias))
    batch = random_batch(11, config)
    one = jax.devices()[:1]
    sgd = one_step(config, {}, SGD, batch, one, initial)
    adamw = one_step(config, {}, make_optimizer(config.optim, config.train.steps)[0], batch, one, initial)
    return initial, batch, sgd, adamw


def gradients(before, after):
    return jax.tree.map(lambda b, a: b - a, before, after)


# Every mesh of the issue; the token transports of expert parallelism spread over the expert meshes. The AdamW
# step (elementwise in the gradients) is checked where its moments are sharded differently from data parallelism.
CASES = [
    ("data=8", None, True),
    ("fsdp=8", None, False),
    ("expert=8", "all_to_all", False),
    ("data=2,expert=4", "all_gather", False),
    ("fsdp=2,tensor=2,expert=2", "all_to_all", True),
    ("fsdp=2,tensor=2,expert=2", "all_gather", False),
]


@pytest.mark.parametrize(("mesh_name", "transport", "check_adamw"), CASES)
def test_sharded_step_equals_one_device(reference, mesh_name, transport, check_adamw):
    initial, batch, (metrics_1, before_1, after_1, bias_1), adamw_1 = reference
    config = tiny_config(expert_parallel_transport=transport)
    devices = jax.devices()
    metrics, before, after, bias = one_step(config, MESHES[mesh_name], SGD, batch, devices, initial)
    for key in ("loss", "ce_loss", "router_z_loss", "grad_norm", "moe_load_imbalance"):
        assert relative_error(metrics[key], metrics_1[key]) <= TOLERANCE, key
    assert_trees_close(gradients(before, after), gradients(before_1, after_1), "gradient")
    assert_trees_close(bias, bias_1, "expert bias after the update")
    if check_adamw:
        tx, _ = make_optimizer(config.optim, config.train.steps)
        _, _, adamw_after, _ = one_step(config, MESHES[mesh_name], tx, batch, devices, initial)
        assert_trees_close(adamw_after, adamw_1[2], "params after one AdamW step")


def test_interpreted_kernels_inside_the_sharded_step(reference):
    """The Pallas lightning kernels (interpret mode) run per shard inside the sharded step, same numbers."""
    initial, batch, (metrics_1, before_1, after_1, _), _ = reference
    config = tiny_config(lightning_implementation="pallas_triton_interpret")
    metrics, before, after, _ = one_step(config, MESHES["data=2,expert=4"], SGD, batch, jax.devices(), initial)
    assert relative_error(metrics["loss"], metrics_1["loss"]) <= TOLERANCE
    assert_trees_close(gradients(before, after), gradients(before_1, after_1), "gradient")


def _moe_and_inputs(seed: int, bias_of_first_experts: float):
    config = ModelConfig.from_config(tiny_config().model)
    moe = MoE(config, rngs=nnx.Rngs(seed))
    # Extreme imbalance: every token picks experts 0..top_k-1, all on the first expert device.
    bias = jnp.zeros(config.num_experts).at[: config.num_experts_per_tok].set(bias_of_first_experts)
    moe.router.expert_bias.set_value(bias)
    x = jax.random.normal(jax.random.key(seed), (8, 16, config.hidden_size))
    return config, moe, x


@pytest.mark.parametrize("transport", ["all_gather", "all_to_all"])
def test_dropless_under_extreme_imbalance_and_idle_experts_get_zero_gradient(transport):
    config, moe, x = _moe_and_inputs(5, bias_of_first_experts=100.0)
    moe.config = config.replace(expert_parallel_transport=transport)
    graphdef, state = nnx.split(moe)

    def loss(state, x):
        out, stats = nnx.merge(graphdef, state)(x)
        return jnp.sum(out**2), (out, stats.expert_load)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (out_1, load_1)), grads_1 = jax.device_get(grad_fn(state, x))
    assert load_1[: config.num_experts_per_tok].sum() == x.shape[0] * x.shape[1] * config.num_experts_per_tok
    mesh = make_mesh({"data": 2, "expert": 4}, use_all=True)
    with jax.set_mesh(mesh):
        (_, (out, load)), grads = jax.device_get(grad_fn(state, x))
    assert relative_error(out, out_1) <= TOLERANCE  # every copy reached expert device 0: nothing dropped
    np.testing.assert_array_equal(load, load_1)
    assert_trees_close(grads, grads_1, "MoE gradient")
    idle = slice(config.num_experts_per_tok, None)
    for name in ("gate", "up", "down"):
        assert np.all(np.asarray(grads["experts"][name].get_value())[idle] == 0.0), name
