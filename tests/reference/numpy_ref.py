"""Float64 NumPy reference of the Ring-linear forward, written from docs/architecture.md.

Independent of the JAX code: plain loops and closed forms, no chunking, no sorting tricks. Weights use the JAX
layout ([in, out] kernels) so tests can feed the model's own parameters.
"""

from __future__ import annotations

import math

import numpy as np

from pallas_kernels.lightning.tests.lightning_testing import numpy_recurrence


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def group_rms_norm(x: np.ndarray, weight: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """x [..., width]: RMS over each of `groups` contiguous channel blocks."""
    parts = np.split(x, groups, axis=-1)
    normed = [p / np.sqrt(np.mean(p * p, axis=-1, keepdims=True) + eps) for p in parts]
    return weight * np.concatenate(normed, axis=-1)


def rope(x: np.ndarray, positions: np.ndarray, theta: float, rotary_dim: int) -> np.ndarray:
    """x [batch, seq, heads, head_dim]; NeoX rotate-half on the first rotary_dim channels."""
    half = rotary_dim // 2
    out = x.copy()
    for j in range(half):
        freq = theta ** (-2.0 * j / rotary_dim)
        angle = positions[:, :, None] * freq
        a, b = x[..., j], x[..., j + half]
        out[..., j] = a * np.cos(angle) - b * np.sin(angle)
        out[..., j + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def alibi_slopes(heads: int) -> np.ndarray:
    """s_h = r^(h+1), r = 2^(-2^-(log2 p - 3)) for the power of two p <= heads; extra heads take
    every second slope of 2p."""

    def geometric(count: int) -> list[float]:
        ratio = 2.0 ** (-(2.0 ** -(math.log2(count) - 3)))
        return [ratio ** (h + 1) for h in range(count)]

    p = 2 ** int(math.floor(math.log2(heads)))
    return np.array(geometric(p) + geometric(2 * p)[0::2][: heads - p])


def gqa_attention(q, k, v, segment_ids=None):
    """q [b, s, H, D], k/v [b, s, Hkv, D]: causal softmax attention, q head i uses kv head i // (H/Hkv)."""
    batch, seq, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(batch):
        for h in range(heads):
            logits = q[b, :, h] @ k[b, :, h // group].T / math.sqrt(dim)
            allowed = np.tril(np.ones((seq, seq), bool))
            if segment_ids is not None:
                allowed &= segment_ids[b][:, None] == segment_ids[b][None, :]
            logits = np.where(allowed, logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[b, :, h // group]
    return out


def route(scores, bias, n_group, topk_group, top_k, scaling, normalize=True):
    """Per token: rank groups by the sum of their 2 best biased scores, keep topk_group groups, take the top_k
    biased scores among their experts; weights = unbiased scores, normalised, times `scaling`.

    scores [tokens, E]. Returns (experts [tokens, top_k] sorted by biased score, weights [tokens, top_k])."""
    tokens, num_experts = scores.shape
    per_group = num_experts // n_group
    all_experts, all_weights = [], []
    for t in range(tokens):
        biased = scores[t] + bias
        group_score = [np.sort(biased[g * per_group : (g + 1) * per_group])[::-1][:2].sum() for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:top_k]
        weights = scores[t, chosen]
        if normalize and top_k > 1:
            weights = weights / (weights.sum() + 1e-20)
        all_experts.append(chosen)
        all_weights.append(weights * scaling)
    return np.array(all_experts), np.array(all_weights)


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, gate, up, down):
    return (silu(x @ gate) * (x @ up)) @ down


def moe(x, layer, cfg):
    """x [tokens, hidden]; layer holds router [h, E], expert_bias [E], expert_gate/expert_up [E, h, I],
    expert_down [E, I, h] and shared_gate/shared_up/shared_down."""
    logits = x @ layer["router"]
    scores = 1.0 / (1.0 + np.exp(-logits))
    experts, weights = route(
        scores, layer["expert_bias"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"],
        cfg["routed_scaling_factor"], cfg["norm_topk_prob"],
    )  # fmt: skip
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t], weights[t], strict=True):
            out[t] += w * swiglu(x[t], layer["expert_gate"][e], layer["expert_up"][e], layer["expert_down"][e])
    if "shared_gate" in layer:
        out += swiglu(x, layer["shared_gate"], layer["shared_up"], layer["shared_down"])
    return out


def is_softmax_layer(i, cfg):
    g, n = cfg["layer_group_size"], cfg["num_hidden_layers"]
    return (i + 1) % g == 0 or i >= (n // g) * g


def segment_positions(segment_ids, batch, seq):
    """[batch, seq] float positions: 0, 1, … within each segment (plain 0..seq-1 without segments)."""
    if segment_ids is None:
        return np.tile(np.arange(seq, dtype=np.float64), (batch, 1))
    positions = np.zeros((batch, seq))
    for b in range(batch):
        for t in range(1, seq):
            positions[b, t] = 0 if segment_ids[b, t] != segment_ids[b, t - 1] else positions[b, t - 1] + 1
    return positions


def decoder_layer(x, layer, cfg, positions, segment_ids, *, index, softmax, dense):
    """x [batch, seq, hidden] -> x + Attn(RMSNorm(x)), then + MLP(RMSNorm(·)). layer: input_norm, post_norm, qkv,
    q_norm, k_norm, out; attn_gate and out_norm for lightning attention; gate_proj/up_proj/down_proj for a dense MLP,
    else the MoE tensors of `moe`. `index` (the 0-based HF layer index) sets the lightning decay."""
    batch, seq, _ = x.shape
    heads, kv_heads, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    rotary = int(dim * cfg["partial_rotary_factor"])
    h = rms_norm(x, layer["input_norm"], eps)
    qkv = h @ layer["qkv"]
    if softmax:
        q = qkv[..., : heads * dim].reshape(batch, seq, heads, dim)
        k = qkv[..., heads * dim : (heads + kv_heads) * dim].reshape(batch, seq, kv_heads, dim)
        v = qkv[..., (heads + kv_heads) * dim :].reshape(batch, seq, kv_heads, dim)
    else:
        q, k, v = (a.reshape(batch, seq, heads, dim) for a in np.split(qkv, 3, axis=-1))
    q = rope(rms_norm(q, layer["q_norm"], eps), positions, cfg["rope_theta"], rotary)
    k = rope(rms_norm(k, layer["k_norm"], eps), positions, cfg["rope_theta"], rotary)
    if softmax:
        attended = gqa_attention(q, k, v, segment_ids).reshape(batch, seq, heads * dim)
    else:
        factor = 1 - (index - cfg["decay_layer_offset"]) / (cfg["num_hidden_layers"] - 1) + 1e-5
        o, _ = numpy_recurrence(q, k, v, alibi_slopes(heads) * factor, dim**-0.5, segment_ids=segment_ids)
        o = group_rms_norm(o.reshape(batch, seq, heads * dim), layer["out_norm"], cfg["group_norm_size"], eps)
        attended = o / (1.0 + np.exp(-(h @ layer["attn_gate"])))
    x = x + attended @ layer["out"]
    h = rms_norm(x, layer["post_norm"], eps)
    if dense:
        return x + swiglu(h, layer["gate_proj"], layer["up_proj"], layer["down_proj"])
    return x + moe(h.reshape(batch * seq, -1), layer, cfg).reshape(x.shape)


def model_hidden(tokens, weights, cfg, segment_ids=None):
    """The residual stream after the last decoder layer (before the final norm), [batch, seq, hidden]."""
    positions = segment_positions(segment_ids, *tokens.shape)
    x = weights["embed"][tokens]
    for i, layer in enumerate(weights["layers"]):
        softmax, dense = is_softmax_layer(i, cfg), i < cfg["first_k_dense_replace"]
        x = decoder_layer(x, layer, cfg, positions, segment_ids, index=i, softmax=softmax, dense=dense)
    return x


def model_logits(tokens, weights, cfg, segment_ids=None):
    """Whole-model logits [batch, seq, vocab]. weights: 'embed' [V, h], 'final_norm', 'lm_head' [h, V], 'layers'
    (one `decoder_layer` dict per layer)."""
    hidden = model_hidden(tokens, weights, cfg, segment_ids)
    return rms_norm(hidden, weights["final_norm"], cfg["rms_norm_eps"]) @ weights["lm_head"]


def mtp_logits(tokens, weights, cfg, segment_ids=None):
    """Logits [batch, seq, vocab] of each multi-token-prediction block d = 1, 2, … (weights['mtp'][d - 1]: embed_norm,
    hidden_norm, projection [2h, h], final_norm and a softmax-attention MoE `layer`), where position t predicts
    token t + d + 1 from h_t and the embedding of token t + d:

        z = [RMSNorm_e(embed(token t + d)) ‖ RMSNorm_h(h_t)] · projection;  h'_t = layer(z);  logits = RMSNorm_f(h'_t)
        · lm_head, with h_t the main stack's residual stream for d = 1 and block d − 1's h' after that.

    Positions t ≥ seq − d have no token t + d (token 0 stands in): their logits are meaningless."""
    batch, seq = tokens.shape
    eps = cfg["rms_norm_eps"]
    positions = segment_positions(segment_ids, batch, seq)
    hidden = model_hidden(tokens, weights, cfg, segment_ids)
    logits = []
    for depth, block in enumerate(weights["mtp"], start=1):
        ahead = np.zeros_like(tokens)
        ahead[:, : seq - depth] = tokens[:, depth:]
        joined = np.concatenate(
            [rms_norm(weights["embed"][ahead], block["embed_norm"], eps), rms_norm(hidden, block["hidden_norm"], eps)],
            axis=-1,
        )
        hidden = decoder_layer(joined @ block["projection"], block["layer"], cfg, positions, segment_ids, index=0,
                               softmax=True, dense=False)  # fmt: skip
        logits.append(rms_norm(hidden, block["final_norm"], eps) @ weights["lm_head"])
    return logits
