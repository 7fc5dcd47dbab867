"""Independent PyTorch (fp32) reference of the HF Ring-linear modeling semantics, written from
docs/architecture.md for parity tests only (not from the JAX code).

Module and parameter names reproduce the HF checkpoint names (docs/architecture.md#checkpoint-format), so
`load_state_dict(strict=True)` checks a state dict for missing / unexpected tensors. Everything runs in fp32 on CPU;
the lightning recurrence is a plain token loop with an fp32 state, which is the definition the chunked kernels must
match.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F


def alibi_slopes(num_heads: int) -> list[float]:
    """Base per-head decay slopes (docs/architecture.md#decay): geometric for powers of two, interleaved otherwise."""

    def power_of_two_slopes(n: int) -> list[float]:
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two_slopes(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two_slopes(lower) + power_of_two_slopes(2 * lower)[0::2][: num_heads - lower]


def is_softmax_layer(layer_idx: int, num_layers: int, group_size: int) -> bool:
    """The layer schedule (docs/architecture.md#layer-schedule): every group_size-th layer and the tail layers use
    softmax attention."""
    return (layer_idx + 1) % group_size == 0 or layer_idx >= (num_layers // group_size) * group_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def group_rms_norm(x: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """x [..., C]: RMS over each of `groups` contiguous channel groups, per-channel weight [C]."""
    shape = x.shape
    xg = x.float().reshape(*shape[:-1], groups, shape[-1] // groups)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xg.reshape(shape).to(x.dtype)


class RotaryEmbedding:
    """Partial NeoX rotary embedding over the first rotary_dim channels of each head."""

    def __init__(self, head_dim: int, partial_rotary_factor: float, theta: float, rope_scaling: Any):
        if rope_scaling is not None:
            raise NotImplementedError(f"reference model supports rope_scaling=None only, got {rope_scaling!r}")
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
        self.inv_freq = (1.0 / theta**exponent).float()

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, heads, head_dim]; positions [seq]."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated_half * sin, passthrough], dim=-1)


class LinearAttention(nn.Module):
    """Lightning attention layer; K and V have as many heads as Q."""

    def __init__(self, cfg: dict, layer_idx: int, decay_layer_offset: int):
        super().__init__()
        h, heads, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
        self.heads, self.head_dim, self.eps = heads, d, cfg["rms_norm_eps"]
        self.groups = cfg["group_norm_size"]
        self.query_key_value = nn.Linear(h, 3 * heads * d, bias=False)
        self.query_layernorm = RMSNorm(d, self.eps)
        self.key_layernorm = RMSNorm(d, self.eps)
        self.g_proj = nn.Linear(h, heads * d, bias=False)
        self.g_norm = nn.Module()
        self.g_norm.weight = nn.Parameter(torch.ones(heads * d))
        self.dense = nn.Linear(heads * d, h, bias=False)
        num_layers = cfg["num_hidden_layers"]
        layer_factor = 1.0 - (layer_idx - decay_layer_offset) / max(num_layers - 1, 1) + 1e-5
        rate = torch.tensor(alibi_slopes(heads), dtype=torch.float64) * layer_factor
        self.decay = torch.exp(-rate).float()  # per-step decay λ_h, [heads]

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, 3 * self.heads, self.head_dim)
        q, k, v = qkv.split(self.heads, dim=2)
        q = rope(self.query_layernorm(q), positions)
        k = rope(self.key_layernorm(k), positions)
        state = torch.zeros(b, self.heads, self.head_dim, self.head_dim, dtype=torch.float32)
        decay = self.decay[None, :, None, None]
        outs = []
        for step in range(t):
            state = decay * state + k[:, step, :, :, None].float() * v[:, step, :, None, :].float()
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, step].float(), state))
        o = torch.stack(outs, dim=1) * self.head_dim**-0.5  # [b, t, heads, d]
        o = group_rms_norm(o.reshape(b, t, -1).to(x.dtype), self.g_norm.weight, self.groups, self.eps)
        return self.dense(o * torch.sigmoid(self.g_proj(x)))


class SoftmaxAttention(nn.Module):
    """Causal GQA softmax attention with QK-norm and partial RoPE, no output gate."""

    def __init__(self, cfg: dict):
        super().__init__()
        h, d = cfg["hidden_size"], cfg["head_dim"]
        self.heads, self.kv_heads, self.head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], d
        self.query_key_value = nn.Linear(h, (self.heads + 2 * self.kv_heads) * d, bias=False)
        self.query_layernorm = RMSNorm(d, cfg["rms_norm_eps"])
        self.key_layernorm = RMSNorm(d, cfg["rms_norm_eps"])
        self.dense = nn.Linear(self.heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        q = rope(self.query_layernorm(q), positions)
        k = rope(self.key_layernorm(k), positions)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * self.head_dim**-0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(v.dtype)
        return self.dense(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid router; expert_bias only steers selection (docs/architecture.md#router-and-moe)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.num_experts, self.top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
        self.n_group, self.topk_group = cfg["n_group"], cfg["topk_group"]
        self.scaling = cfg["routed_scaling_factor"]
        self.weight = nn.Parameter(torch.zeros(self.num_experts, cfg["hidden_size"]))
        self.expert_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (expert ids [tokens, top_k], weights [tokens, top_k])."""
        scores = torch.sigmoid(x.float() @ self.weight.float().T)
        biased = scores + self.expert_bias.float()
        grouped = biased.view(x.shape[0], self.n_group, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep_groups = group_scores.topk(self.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter(1, keep_groups, 1.0).bool()
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(x.shape[0], -1)
        ids = biased.masked_fill(~expert_mask, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class MoE(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(SwiGLU(h, cfg["moe_intermediate_size"]) for _ in range(cfg["num_experts"]))
        shared_width = cfg["moe_shared_expert_intermediate_size"] * cfg["num_shared_experts"]
        self.shared_experts = SwiGLU(h, shared_width) if shared_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.gate(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.nonzero(ids == e, as_tuple=True)
            if token_idx.numel():
                contrib = expert(flat[token_idx]) * weights[token_idx, slot, None].to(flat.dtype)
                out.index_add_(0, token_idx, contrib)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, decay_layer_offset: int, *, softmax: bool, dense: bool):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        if softmax:
            self.attention = SoftmaxAttention(cfg)
        else:
            self.attention = LinearAttention(cfg, layer_idx, decay_layer_offset)
        self.mlp = SwiGLU(h, cfg["intermediate_size"]) if dense else MoE(cfg)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), rope, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(DecoderLayer):
    """Multi-token-prediction block: enorm, hnorm, eh_proj, a softmax-attention MoE decoder layer, final_layernorm
    (docs/architecture.md#multi-token-prediction)."""

    def __init__(self, cfg: dict):
        super().__init__(cfg, layer_idx=-1, decay_layer_offset=0, softmax=True, dense=False)
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.final_layernorm = RMSNorm(h, eps)

    def predict(
        self, hidden: torch.Tensor, ahead: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous stage's residual stream; ahead: embeddings of the tokens d positions ahead ->
        (this block's residual stream, the lm_head input)."""
        x = self(self.eh_proj(torch.cat([self.enorm(ahead), self.hnorm(hidden)], dim=-1)), rope, positions)
        return x, self.final_layernorm(x)


class TorchRingLinear(nn.Module):
    """`model(tokens [batch, seq] int) -> logits [batch, seq, vocab] fp32`. `decay_layer_offset` is δ of the lightning
    decay. MTP blocks are modules `model.layers.{L + d}` (L = num_hidden_layers), as a Ling-2.5 checkpoint names them;
    `mtp_logits(tokens)` runs them."""

    def __init__(self, cfg: dict, decay_layer_offset: int = 1):
        super().__init__()
        h, num_layers, group = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["layer_group_size"]
        self.num_layers = num_layers
        self.rope = RotaryEmbedding(
            cfg["head_dim"], cfg["partial_rotary_factor"], cfg["rope_theta"], cfg.get("rope_scaling")
        )
        self.model = nn.Module()
        self.model.word_embeddings = nn.Embedding(cfg["vocab_size"], h)
        self.model.layers = nn.ModuleList(
            DecoderLayer(cfg, i, decay_layer_offset, softmax=is_softmax_layer(i, num_layers, group),
                         dense=i < cfg["first_k_dense_replace"])
            for i in range(num_layers)
        )  # fmt: skip
        self.model.layers.extend(MTPLayer(cfg) for _ in range(cfg.get("num_nextn_predict_layers", 0)))
        self.model.norm = RMSNorm(h, cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(h, cfg["vocab_size"], bias=False)

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])
        x = self.model.word_embeddings(tokens)
        for layer in self.model.layers[: self.num_layers]:
            x = layer(x, self.rope, positions)
        return x

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(self._hidden(tokens))).float()

    @torch.no_grad()
    def mtp_logits(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Logits [batch, seq, vocab] of MTP block d = 1, 2, …: position t predicts token t + d + 1. Positions
        t >= seq - d have no token t + d (token 0 stands in), so their logits are meaningless."""
        positions = torch.arange(tokens.shape[1])
        hidden, logits = self._hidden(tokens), []
        for depth, block in enumerate(self.model.layers[self.num_layers :], start=1):
            ahead = torch.zeros_like(tokens)
            ahead[:, :-depth] = tokens[:, depth:]
            hidden, normed = block.predict(hidden, self.model.word_embeddings(ahead), self.rope, positions)
            logits.append(self.lm_head(normed).float())
        return logits

    @classmethod
    def from_state_dict(
        cls, cfg: dict, state_dict: dict[str, torch.Tensor], decay_layer_offset: int = 1
    ) -> TorchRingLinear:
        model = cls(cfg, decay_layer_offset)
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, decay_layer_offset: int = 1) -> TorchRingLinear:
        """Loads an HF directory: config.json plus model.safetensors or sharded files with an index."""
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        state_dict: dict[str, torch.Tensor] = {}
        for name in files:
            state_dict.update(load_file(path / name))
        return cls.from_state_dict(cfg, state_dict, decay_layer_offset)
