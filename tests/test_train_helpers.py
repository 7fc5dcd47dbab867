"""A tiny training config shared by the training tests (same architecture as configs/default.py, toy sizes)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("default_config", os.path.join(REPO, "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


TINY_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=3,  # layer 0 dense MLP + lightning, 1 MoE + lightning, 2 MoE + softmax
    layer_group_size=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    group_norm_size=2,
    intermediate_size=64,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=16,
    num_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
)

TINY_OVERRIDES = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--config.train.batch_size=4",
    "--config.train.seq_len=32",
    "--config.train.log_every=1",
    "--config.optim.warmup_steps=1",
    "--config.data.num_default_documents=2000",
    "--config.logging.progress_bar=False",
]


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    config = default_config()
    config.model.update(TINY_MODEL)
    config.train.batch_size = 4
    config.train.seq_len = 32
    config.train.steps = 6
    config.train.log_every = 1
    config.optim.warmup_steps = 1
    config.optim.learning_rate = 3e-3
    config.checkpoint.every_n_steps = 2
    config.data.num_default_documents = 2000
    config.logging.progress_bar = False
    for dotted, value in train_overrides.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config
