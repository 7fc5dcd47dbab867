"""Shared helpers: tiny model configs and access to one layer's weights by HF layer index."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import ModelConfig, model_defaults
from ring_jax.model import RingLinearModel, layer_locations

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(**overrides: Any) -> ModelConfig:
    """10 layers, G=3: dense layer 0; pre layers 0–2; scanned cycles 3–5 and 6–8; softmax tail layer 9."""
    section = model_defaults()
    section.update(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=10,
        layer_group_size=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        group_norm_size=2,
        intermediate_size=48,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        rope_theta=10000.0,
        max_position_embeddings=512,
    )
    section.update(overrides)
    return ModelConfig.from_config(section)


def randomize_expert_biases(model: RingLinearModel, seed: int = 7) -> None:
    """Non-zero biases so that selection and weighting differ, as in trained checkpoints."""
    from ring_jax.layers.moe import ExpertBias

    state = nnx.state(model, ExpertBias)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(0, 0.3, leaf.shape).astype(np.float32) for leaf in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


def layer_state(model: RingLinearModel, index: int) -> dict:
    """Pure-dict weights of HF layer `index` (unstacked from the scanned cycles when needed)."""
    location = layer_locations(model.config)[index]
    if location[0] == "cycle":
        _, cycle, position = location
        state = nnx.to_pure_dict(nnx.state(model.cycles.layers[position]))
        return jax.tree.map(lambda leaf: np.asarray(leaf[cycle]), state)
    layers = model.pre_layers if location[0] == "pre" else model.post_layers
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(layers[location[1]])))


def numpy_weights(model: RingLinearModel) -> dict:
    """The model's weights in the layout of tests/reference/numpy_ref.model_logits (float64)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    config = model.config
    layers = []
    for index in range(config.num_hidden_layers):
        state = layer_state(model, index)
        attention, mlp = state["attention"], state["mlp"]
        layer = {
            "input_norm": f64(state["input_norm"]["scale"]),
            "post_norm": f64(state["post_attention_norm"]["scale"]),
            "qkv": f64(attention["qkv"]["kernel"]),
            "q_norm": f64(attention["qk"]["q_norm"]["scale"]),
            "k_norm": f64(attention["qk"]["k_norm"]["scale"]),
            "out": f64(attention["out"]["kernel"]),
        }
        if "gate" in attention:
            layer.update(attn_gate=f64(attention["gate"]["kernel"]), out_norm=f64(attention["out_norm"]["scale"]))
        if "router" in mlp:
            layer.update(
                router=f64(mlp["router"]["kernel"]),
                expert_bias=f64(mlp["router"]["expert_bias"]),
                expert_gate=f64(mlp["experts"]["gate"]),
                expert_up=f64(mlp["experts"]["up"]),
                expert_down=f64(mlp["experts"]["down"]),
                shared_gate=f64(mlp["shared"]["gate"]["kernel"]),
                shared_up=f64(mlp["shared"]["up"]["kernel"]),
                shared_down=f64(mlp["shared"]["down"]["kernel"]),
            )
        else:
            layer.update(
                gate_proj=f64(mlp["gate"]["kernel"]),
                up_proj=f64(mlp["up"]["kernel"]),
                down_proj=f64(mlp["down"]["kernel"]),
            )
        layers.append(layer)
    return {
        "embed": f64(model.embed.embedding[...]),
        "final_norm": f64(model.final_norm.scale[...]),
        "lm_head": f64(model.lm_head.kernel[...]),
        "layers": layers,
    }


def relative_error(actual: Any, expected: Any) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def jit_forward(model: RingLinearModel) -> Any:
    """`model.forward` compiled once (eager NNX dispatch is slow); same keyword arguments."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state: Any, tokens: jax.Array, **kwargs: Any) -> Any:
        return nnx.merge(graphdef, state, copy=True).forward(tokens, **kwargs)

    return lambda tokens, **kwargs: forward(state, tokens, **kwargs)
