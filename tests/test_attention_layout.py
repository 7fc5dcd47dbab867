"""attention_layout="softmax": every layer a GQA softmax layer of the hybrid's sizes (the speed baseline)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import tiny_config

import ring_jax
from ring_jax.alignment import compare_paths
from ring_jax.config import ConfigError
from ring_jax.convert import HFConfigError
from ring_jax.model import KVCache, RingLinearModel, abstract_model

SEED = 404
LAYOUT = dict(num_hidden_layers=4, layer_group_size=2)


def test_every_layer_is_softmax_with_the_hybrid_sizes():
    hybrid, softmax = tiny_config(**LAYOUT), tiny_config(**LAYOUT, attention_layout="softmax")
    assert [hybrid.is_softmax_layer(i) for i in range(4)] == [False, True, False, True]
    assert all(softmax.is_softmax_layer(i) for i in range(4))
    shapes = lambda config: jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(abstract_model(config))))
    hybrid_shapes, softmax_shapes = shapes(hybrid), shapes(softmax)
    assert softmax_shapes["pre_layers"][0]["attention"] == hybrid_shapes["pre_layers"][1]["attention"]
    assert softmax_shapes["cycles"]["layers"][0] == softmax_shapes["cycles"]["layers"][1]
    assert softmax_shapes["cycles"]["layers"][1] == hybrid_shapes["cycles"]["layers"][1]
    with pytest.raises(ConfigError, match="^model.attention_layout: must be one of"):
        tiny_config(attention_layout="linear")


def test_all_softmax_model_caches_only_keys_and_values_and_aligns():
    model = RingLinearModel(tiny_config(**LAYOUT, attention_layout="softmax"), rngs=nnx.Rngs(SEED))
    cache = model.init_cache(batch=1, max_length=24)
    assert all(isinstance(c, KVCache) for c in (*cache.pre, *cache.cycles, *cache.post))
    tokens = jnp.asarray(np.random.default_rng(SEED).integers(0, 61, (1, 24)), jnp.int32)
    report = compare_paths(model, tokens, prefill_fraction=2 / 3, chunk=8)
    assert report.max_abs <= 1e-4 and report.layer_errors.max() < 1e-5, report.layer_errors


def test_hf_export_refuses_the_all_softmax_layout(tmp_path):
    model = RingLinearModel(tiny_config(**LAYOUT, attention_layout="softmax"), rngs=nnx.Rngs(SEED))
    with pytest.raises(HFConfigError, match="attention_layout='softmax' cannot be exported"):
        ring_jax.to_hf(model, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
