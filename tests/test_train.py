"""Training: schedules, bias rule, validation before compile, exact resume, NaN handling, loss falls."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import tiny_train_config

from ring_jax.config import ConfigError
from ring_jax.data.errors import DataError
from ring_jax.data.pipeline import make_dataset
from ring_jax.sharding import make_mesh
from ring_jax.train.checkpoint import Checkpointer, all_finite
from ring_jax.train.loop import NonFiniteError, train, validate
from ring_jax.train.optim import decay_mask, make_optimizer, make_schedule
from ring_jax.train.state import StateFactory
from ring_jax.train.step import make_train_step, mtp_targets, update_expert_bias


def test_expert_bias_sign_rule():
    bias = jnp.array([0.0, 0.1, -0.1, 0.0])
    load = jnp.array([1.0, 1.0, 1.0, 9.0])  # mean 3: three under-loaded experts, one over-loaded
    np.testing.assert_allclose(update_expert_bias(bias, load, 0.01, zero_mean=False),
                               bias + 0.01 * jnp.array([1.0, 1.0, 1.0, -1.0]), rtol=1e-6)
    # zero-mean variant subtracts mean(sign) = 0.5, so the biases keep their sum
    zero_mean = update_expert_bias(bias, load, 0.01, zero_mean=True)
    np.testing.assert_allclose(zero_mean, bias + 0.01 * jnp.array([0.5, 0.5, 0.5, -1.5]), rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(zero_mean), jnp.sum(bias), atol=1e-7)
    stacked = update_expert_bias(jnp.zeros((2, 4)), jnp.array([[1.0, 5, 3, 3], [2, 2, 2, 2]]), 0.1, True)
    np.testing.assert_allclose(stacked, [[0.1, -0.1, 0, 0], [0, 0, 0, 0]], atol=1e-7)


def test_schedules_and_decay_mask():
    optim = tiny_train_config().optim
    optim.update(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cosine = make_schedule(optim, 110)
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(110)) == pytest.approx(0.1)
    optim.update(schedule="wsd", decay_fraction=0.2)
    wsd = make_schedule(optim, 110)
    assert [float(wsd(s)) for s in (10, 50, 88)] == pytest.approx([1.0, 1.0, 1.0])
    assert float(wsd(99)) == pytest.approx(1.0 - 0.9 * 11 / 22) and float(wsd(110)) == pytest.approx(0.1)
    mask = decay_mask({"norm": {"scale": 0}, "proj": {"kernel": 0}, "embed": {"embedding": 0}})
    assert mask == {"norm": {"scale": False}, "proj": {"kernel": True}, "embed": {"embedding": True}}


@pytest.mark.slow
def test_no_weight_decay_on_the_model_norm_scales():
    """On the real parameter tree (an nnx.State of Params): zero gradients move kernels by decay, never norms."""
    config = tiny_train_config()
    config.optim.update(learning_rate=0.1, weight_decay=0.5, warmup_steps=0, clip_norm=0.0)
    factory, _ = _factory_and_step(config)
    params = factory.init().params
    tx = factory.tx
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = {
        "/".join(str(getattr(k, "key", k)) for k in path): float(jnp.abs(u.get_value()).max())
        for path, u in nnx.to_flat_state(updates)
    }
    norms = [name for name in moved if name.endswith("scale")]
    kernels = [name for name in moved if name.endswith(("kernel", "embedding"))]
    assert norms and kernels
    assert all(moved[name] == 0.0 for name in norms), [n for n in norms if moved[n]]
    assert all(moved[name] > 0.0 for name in kernels)


class CompileCounter:
    """Counts XLA backend compilations while active."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if "backend_compile" in event:
            self.count += 1


def test_bad_config_and_data_fail_before_compilation(tmp_path):
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    cases = [
        (dict(train__nan_policy="ignore"), ConfigError, "train.nan_policy"),
        (dict(optim__schedule="linear"), ConfigError, "optim.schedule"),
        (dict(train__grad_accum_steps=3), ConfigError, "train.batch_size"),
        (dict(train__seq_len=10**6), ConfigError, "train.seq_len"),
        (dict(mesh__data=3), ConfigError, "mesh"),
        (dict(model__num_key_value_heads=3), ConfigError, "num_key_value_heads"),
        (dict(train__loss_implementation="fused"), ConfigError, "train.loss_implementation"),
        (dict(train__loss_chunk_size=0), ConfigError, "train.loss_chunk_size"),
        (dict(data__source=str(tmp_path / "nope.jsonl")), DataError, "data.source: no file matches"),
        (dict(model__vocab_size=200), DataError, "model.vocab_size=200"),
    ]
    for overrides, error, field in cases:
        with pytest.raises(error, match=field):
            train(tiny_train_config(**overrides), str(tmp_path / "run"))
    assert counter.count == 0, "errors must surface before anything is compiled"
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_resume_is_bitwise_exact(tmp_path):
    straight = train(tiny_train_config(), str(tmp_path / "straight"))
    first = train(tiny_train_config(), str(tmp_path / "resumed"), stop_at_step=3)
    second = train(tiny_train_config(), str(tmp_path / "resumed"))
    assert (straight.start_step, first.final_step, second.start_step, second.final_step) == (0, 3, 3, 6)
    resumed = {**first.losses, **second.losses}
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == straight.losses  # exact float equality, step by step

    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "learning_rate", "tokens_per_second", "grad_norm", "moe_load_imbalance"):
        assert key in records[-1]
    assert len(records[-1]["moe_load_imbalance"]) == 2  # MoE layers 1 and 2
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "straight" / "tensorboard"))
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["train"]["steps"] == 6


def _factory_and_step(config):
    model_config = validate(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    factory = StateFactory(model_config, tx, make_mesh(config.mesh, use_all=True), seed=0)
    return factory, make_train_step(factory, config)


def test_gradient_accumulation_and_remat_match_one_big_batch():
    results = []
    for overrides in (dict(), dict(train__grad_accum_steps=2, model__remat_policy="full")):
        config = tiny_train_config(**overrides)
        factory, train_step = _factory_and_step(config)
        batch = next(iter(make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=272)))
        with jax.set_mesh(factory.mesh):
            state, metrics = train_step(factory.init(), batch)
        results.append(jax.device_get((metrics, state.params, state.expert_load)))
    (one, params_one, load_one), (accumulated, params_acc, load_acc) = results
    for key in ("loss", "ce_loss", "grad_norm", "loss_tokens"):
        np.testing.assert_allclose(accumulated[key], one[key], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_acc, params_one)
    jax.tree.map(np.testing.assert_array_equal, load_acc, load_one)  # counts summed over micro-batches


def test_non_finite_step_leaves_state_unchanged_and_bias_moves():
    config = tiny_train_config(optim__bias_update_rate=0.01)
    factory, train_step = _factory_and_step(config)
    batches = iter(make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=config.model.vocab_size))
    state = factory.init()
    with jax.set_mesh(factory.mesh):
        poisoned = dict(next(batches))
        poisoned["loss_mask"] = poisoned["loss_mask"].copy()
        poisoned["loss_mask"][0, 0] = np.nan
        before = jax.device_get(state)
        state, metrics = train_step(state, poisoned)
        assert not bool(metrics["finite"])
        after = jax.device_get(state)
        assert int(after.step) == 1
        for key in ("params", "opt_state", "expert_bias"):
            jax.tree.map(np.testing.assert_array_equal, getattr(after, key), getattr(before, key))
        state, metrics = train_step(state, next(batches))
        assert bool(metrics["finite"]) and all_finite(state.params)
        bias = np.concatenate([np.ravel(b) for b in jax.tree.leaves(jax.device_get(state.expert_bias))])
        assert np.abs(bias).max() > 0.004, "biases move by rate * (sign - mean sign) after a finite step"
        assert np.abs(bias.reshape(-1, 4).sum(-1)).max() < 1e-6  # zero-mean variant keeps each layer's sum


def test_nan_stops_naming_the_step_and_never_checkpoints_nan(tmp_path):
    config = tiny_train_config(optim__learning_rate=1e30, optim__clip_norm=0.0, optim__warmup_steps=0,
                         checkpoint__every_n_steps=1, train__steps=8)
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .*train.nan_policy='stop'"):
        train(config, str(tmp_path / "stop"))
    config.train.nan_policy = "skip"
    config.train.max_skipped_steps = 2
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps"):
        train(config, str(tmp_path / "skip"))
    for run in ("stop", "skip"):
        checkpointer = Checkpointer(str(tmp_path / run / "checkpoints"), every_n_steps=1, keep=3)
        factory, _ = _factory_and_step(config)
        iterator = iter(make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=272))
        restored = checkpointer.restore_latest(factory.abstract_with_shardings(), iterator)
        if restored is not None:  # whatever was saved must be finite
            assert all_finite(restored[1])
        checkpointer.close()


def test_loss_falls_on_a_tiny_run(tmp_path):
    result = train(tiny_train_config(train__steps=40, train__log_every=10, checkpoint__every_n_steps=0),
                   str(tmp_path / "run"))
    first = np.mean([result.losses[s] for s in range(1, 4)])
    last = np.mean([result.losses[s] for s in range(38, 41)])
    assert last < first - 1.5, (first, last)


def test_mtp_loss_targets_stay_inside_documents():
    batch = {
        "targets": jnp.array([[1, 2, 3, 4, 5, 0]]),
        "loss_mask": jnp.array([[1.0, 1, 1, 1, 1, 0]]),
        "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]]),
    }
    targets, mask = mtp_targets(batch, 1)  # position t predicts targets[t + 1]
    np.testing.assert_array_equal(targets, [[2, 3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 0, 0]])  # t=2 would cross into document 2

    config = tiny_train_config(model__num_nextn_predict_layers=1)
    factory, train_step = _factory_and_step(config)
    batch = next(iter(make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=272)))
    with jax.set_mesh(factory.mesh):
        _, metrics = jax.device_get(train_step(factory.init(), batch))
    assert 4.0 < metrics["mtp_loss"] < 8.0  # ≈ ln(272) at initialisation
    expected = metrics["ce_loss"] + 3.5e-6 * metrics["router_z_loss"] + 0.1 * metrics["mtp_loss"]
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)


@pytest.mark.slow
def test_scanned_cycles_train_like_unrolled_layers():
    """6 layers, G=3: layers 3-5 form a scanned cycle; every MoE layer's bias moves, scan == unrolled."""
    losses = []
    for scan_layers in (True, False):
        config = tiny_train_config(optim__bias_update_rate=0.01)
        config.model.num_hidden_layers = 6
        config.model.scan_layers = scan_layers
        factory, train_step = _factory_and_step(config)
        data = make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=config.model.vocab_size)
        batch = next(iter(data))
        with jax.set_mesh(factory.mesh):
            state, metrics = train_step(factory.init(), batch)
        bias = jax.device_get(state.expert_bias)
        cycle_bias = np.asarray(bias["cycles"]["layers"][0]["mlp"]["router"]["expert_bias"])
        assert cycle_bias.shape == (1, 4) and np.abs(cycle_bias).max() > 0.004
        loads = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.expert_load))]
        real_tokens = float((batch["segment_ids"] > 0).sum())
        assert sum(float(x.sum()) for x in loads) == pytest.approx(5 * real_tokens * 2)  # 5 MoE layers, top-2
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_metrics_file_keeps_one_record_per_step_after_a_resume(tmp_path):
    from ring_jax.train.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()  # "crash" after step 5; the last checkpoint is step 3
    writer = MetricsWriter(str(tmp_path), tensorboard=False, start_step=3)
    for step in (4, 5):
        writer.write(step, {"loss": 10.0 * step})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0]


def test_fused_chunked_loss_step_matches_full_logits_step():
    """The train step's lm_head + CE through the chunked custom VJP (several chunks, a padded last one) against
    full fp32 logits and autodiff: same loss, gradient norm and updated parameters; with an MTP head too."""
    results = []
    for implementation in ("chunked", "reference"):
        config = tiny_train_config(train__loss_implementation=implementation, train__loss_chunk_size=48,
                             model__num_nextn_predict_layers=1)  # fmt: skip
        factory, train_step = _factory_and_step(config)
        batch = next(iter(make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=272)))
        with jax.set_mesh(factory.mesh):
            state, metrics = train_step(factory.init(), batch)
        results.append(jax.device_get((metrics, state.params)))
    (chunked, params_chunked), (reference, params_reference) = results
    assert float(chunked["mtp_loss"]) > 0
    for key in ("loss", "ce_loss", "mtp_loss", "grad_norm"):
        np.testing.assert_allclose(chunked[key], reference[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), params_chunked,
                 params_reference)  # fmt: skip
