"""Tiny random HF-format Ring-linear checkpoints for conversion tests, built from the PyTorch reference model
(so tensor names and shapes come from the independent reference, not from the converter under test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from reference.torch_model import TorchRingLinear


def tiny_hf_config(**overrides: Any) -> dict[str, Any]:
    """config.json of a 10-layer model, G=3: dense layer 0, cycles 3–5 and 6–8, softmax tail layer 9,
    8 experts in 4 groups (top-2 of the best 2 groups), 4 heads of 8, 2 KV heads."""
    config = {
        "model_type": "bailing_moe_linear",
        "architectures": ["BailingMoeLinearV2ForCausalLM"],
        "hidden_size": 32,
        "num_hidden_layers": 10,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 61,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "layer_group_size": 3,
        "group_norm_size": 2,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "use_qk_norm": True,
        "use_bias": False,
        "use_qkv_bias": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "use_rmsnorm": True,
        "num_nextn_predict_layers": 0,
        "router_dtype": "fp32",
        "linear_silu": False,
        "eos_token_id": 60,
        "pad_token_id": 60,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def random_state_dict(config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random weights for every tensor of `config` (norm scales around 1, non-zero fp32 expert biases)."""
    torch.manual_seed(seed)
    model = TorchRingLinear(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("expert_bias"):
            state[name] = 0.3 * torch.randn(tensor.shape)  # fp32 whatever the weight dtype
        elif tensor.ndim == 1:
            state[name] = (1.0 + 0.2 * torch.randn(tensor.shape)).to(dtype)
        else:
            state[name] = (tensor * 2.0).to(dtype).contiguous()
    return state


def write_hf_checkpoint(
    directory: Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor], num_shards: int = 1
) -> None:
    """config.json plus `model.safetensors`, or `num_shards` round-robin shards and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    names = list(state_dict)
    if num_shards == 1:
        save_file(state_dict, directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {name: state_dict[name] for name in names[k::num_shards]}
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())}}
    index["weight_map"] = weight_map
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
