"""The HF ⇄ ring_jax name mapping, as data, and its expansion into a per-tensor plan.

`MODEL_RULES` and `LAYER_RULES` are the whole mapping: ring_jax parameter path ↔ HF tensor name, a transform,
and when the rule applies. `build_plan` expands them over the layer schedule
(`ring_jax.model.layer_locations`: unstacked pre/post layers, cycle layers stacked on a leading [num_cycles]
axis) and over experts (HF stores one tensor per expert, ring_jax stacks them on an [num_experts] axis). The
result is one `LeafPlan` per ring_jax leaf listing which HF tensor fills which index of it; both conversion
directions are driven by that plan alone.

HF linear weights are [out, in] and ring_jax kernels [in, out], hence TRANSPOSE. The fused qkv weight keeps
its fused layout: ring_jax splits its columns exactly as HF splits rows ([Q heads | K heads | V heads],
head-major).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ring_jax.config import ModelConfig


class Transform(enum.Enum):
    KEEP = "keep"
    TRANSPOSE = "transpose"  # HF [out, in] ⇄ ring_jax [in, out]

    def to_ring(self, hf_tensor: np.ndarray) -> np.ndarray:
        return hf_tensor.T if self is Transform.TRANSPOSE else hf_tensor

    def to_hf(self, ring_tensor: np.ndarray) -> np.ndarray:
        return ring_tensor.T if self is Transform.TRANSPOSE else ring_tensor

    def hf_shape(self, ring_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(ring_shape)) if self is Transform.TRANSPOSE else ring_shape


# When a layer-scoped rule applies to layer i.
Condition = Callable[[ModelConfig, int], bool]
ALL: Condition = lambda c, i: True
LINEAR_ATTN: Condition = lambda c, i: not c.is_softmax_layer(i)
SOFTMAX_ATTN: Condition = lambda c, i: c.is_softmax_layer(i)
DENSE_MLP: Condition = lambda c, i: not c.is_moe_layer(i)
MOE: Condition = lambda c, i: c.is_moe_layer(i)
SHARED_EXPERT: Condition = lambda c, i: c.is_moe_layer(i) and c.num_shared_experts > 0
QK_NORM = lambda c: c.use_qk_norm
EXPERT_BIAS = lambda c: c.moe_router_enable_expert_bias


@dataclass(frozen=True)
class Rule:
    ring: str  # dotted path (inside the model, or inside one decoder layer for LAYER_RULES)
    # HF name (LAYER_RULES: after "model.layers.{i}."); "{e}" marks per-expert tensors, stacked on axis 0
    hf: str
    transform: Transform
    when: Condition = ALL  # the layer has this parameter
    # Whether the checkpoint stores it (QK-norm scales and expert biases are optional in HF), and the
    # value the ring_jax parameter takes when it does not.
    stored: Callable[[ModelConfig], bool] = lambda c: True
    fill_absent: float | None = None

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf


K, T = Transform.KEEP, Transform.TRANSPOSE

MODEL_RULES: tuple[Rule, ...] = (
    Rule("embed.embedding", "model.word_embeddings.weight", K),
    Rule("final_norm.scale", "model.norm.weight", K),
    Rule("lm_head.kernel", "lm_head.weight", T),
)

LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_norm.scale", "input_layernorm.weight", K),
    Rule("post_attention_norm.scale", "post_attention_layernorm.weight", K),
    # both attention kinds
    Rule("attention.qkv.kernel", "attention.query_key_value.weight", T),
    Rule("attention.qk.q_norm.scale", "attention.query_layernorm.weight", K, stored=QK_NORM, fill_absent=1.0),
    Rule("attention.qk.k_norm.scale", "attention.key_layernorm.weight", K, stored=QK_NORM, fill_absent=1.0),
    Rule("attention.out.kernel", "attention.dense.weight", T),
    # lightning attention only: sigmoid output gate and grouped RMSNorm
    Rule("attention.gate.kernel", "attention.g_proj.weight", T, LINEAR_ATTN),
    Rule("attention.out_norm.scale", "attention.g_norm.weight", K, LINEAR_ATTN),
    # dense SwiGLU (first_k_dense_replace layers)
    Rule("mlp.gate.kernel", "mlp.gate_proj.weight", T, DENSE_MLP),
    Rule("mlp.up.kernel", "mlp.up_proj.weight", T, DENSE_MLP),
    Rule("mlp.down.kernel", "mlp.down_proj.weight", T, DENSE_MLP),
    # MoE: router, stacked routed experts, shared expert
    Rule("mlp.router.kernel", "mlp.gate.weight", T, MOE),
    Rule("mlp.router.expert_bias", "mlp.gate.expert_bias", K, MOE, stored=EXPERT_BIAS, fill_absent=0.0),
    Rule("mlp.experts.gate", "mlp.experts.{e}.gate_proj.weight", T, MOE),
    Rule("mlp.experts.up", "mlp.experts.{e}.up_proj.weight", T, MOE),
    Rule("mlp.experts.down", "mlp.experts.{e}.down_proj.weight", T, MOE),
    Rule("mlp.shared.gate.kernel", "mlp.shared_experts.gate_proj.weight", T, SHARED_EXPERT),
    Rule("mlp.shared.up.kernel", "mlp.shared_experts.up_proj.weight", T, SHARED_EXPERT),
    Rule("mlp.shared.down.kernel", "mlp.shared_experts.down_proj.weight", T, SHARED_EXPERT),
)

# Multi-token-prediction block d (docs/architecture.md#multi-token-prediction): these rules plus the decoder layer's
# LAYER_RULES, all under the block's name prefix (`MTPLayout.block_prefix`); in the ring_jax tree the layer is
# "mtp_layers.{d}.layer".
MTP_RULES: tuple[Rule, ...] = (
    Rule("embed_norm.scale", "enorm.weight", K),
    Rule("hidden_norm.scale", "hnorm.weight", K),
    Rule("projection.kernel", "eh_proj.weight", T),
    Rule("final_norm.scale", "final_layernorm.weight", K),
)

# Substrings of HF names holding no weights (non-persistent buffers some exporters keep): skipped on import.
IGNORED_HF_SUBSTRINGS = ("slope", "inv_freq")
MTP_PREFIX = "model.mtp."  # the separate prefix some exporters use for MTP blocks (engines skip it)
_APPENDED_MTP_MARKER = re.compile(r"model\.layers\.(\d+)\.eh_proj\.weight")  # only MTP blocks hold eh_proj
_PREFIXED_MTP_BLOCK = re.compile(r"model\.mtp\.layers\.(\d+)\.")


@dataclass(frozen=True)
class MTPLayout:
    """Where a checkpoint keeps its MTP blocks, found from its tensor names by `mtp_layout`.

    kind: "appended" (block d is `model.layers.{main_layers + d}`, the Ling-2.5 layout and the one ring_jax writes),
    "inside" (the same names, but config.json's num_hidden_layers counts the blocks: the Ling-2.0 layout),
    "prefixed" (block d is `model.mtp.layers.{d}`) or "none" (no MTP tensors: names as "appended").
    main_layers: decoder layers of the main stack (ring_jax's num_hidden_layers).
    held: the MTP blocks the checkpoint holds.
    """

    kind: str
    main_layers: int
    held: int

    def block_prefix(self, depth: int) -> str:
        if self.kind == "prefixed":
            return f"{MTP_PREFIX}layers.{depth}."
        return f"model.layers.{self.main_layers + depth}."

    def is_unused(self, name: str, used: int) -> bool:
        """Whether `name` belongs to an MTP block past the first `used` (a config with num_nextn_predict_layers =
        `used` has no place for it); under the `model.mtp.` prefix, so does any name outside its blocks."""
        if self.kind == "prefixed":
            block = _PREFIXED_MTP_BLOCK.match(name)
            return name.startswith(MTP_PREFIX) and (block is None or int(block.group(1)) >= used)
        return any(name.startswith(self.block_prefix(depth)) for depth in range(used, self.held))


def mtp_layout(names: Iterable[str], num_hidden_layers: int, num_nextn_predict_layers: int) -> MTPLayout:
    """The MTP layout of a checkpoint with these tensor names and config.json values (see `MTPLayout`).

    Raises ValueError when MTP blocks appear both under `model.mtp.` and among `model.layers.*`."""
    names = list(names)
    appended = sorted(int(m.group(1)) for m in map(_APPENDED_MTP_MARKER.fullmatch, names) if m)
    prefixed = [name for name in names if name.startswith(MTP_PREFIX)]
    if appended and prefixed:
        raise ValueError(f"MTP blocks stored twice: as {prefixed[0]!r} and as 'model.layers.{appended[0]}.*'")
    if prefixed:
        depths = [int(m.group(1)) for m in map(_PREFIXED_MTP_BLOCK.match, prefixed) if m]
        return MTPLayout("prefixed", num_hidden_layers, max(depths, default=-1) + 1)
    if not appended:
        return MTPLayout("none", num_hidden_layers, 0)
    if num_nextn_predict_layers and appended[0] == num_hidden_layers - num_nextn_predict_layers:
        return MTPLayout("inside", appended[0], len(appended))
    return MTPLayout("appended", num_hidden_layers, len(appended) if appended[0] == num_hidden_layers else 0)


Path = tuple[str | int, ...]


def _split(dotted: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


@dataclass(frozen=True)
class Piece:
    """HF tensor `hf_name` fills `leaf[index]` of a ring_jax leaf after `transform`."""

    hf_name: str
    index: tuple[int, ...]
    transform: Transform


@dataclass
class LeafPlan:
    path: Path
    pieces: list[Piece] = field(default_factory=list)
    fill_absent: float | None = None  # set when the leaf has no HF counterpart for this config


def layer_prefix(location: tuple) -> tuple[Path, tuple[int, ...]]:
    """A `layer_locations` entry -> (path of the layer module, index into stacked leaves)."""
    kind = location[0]
    if kind == "pre":
        return ("pre_layers", location[1]), ()
    if kind == "post":
        return ("post_layers", location[1]), ()
    if kind == "cycle":
        return ("cycles", "layers", location[2]), (location[1],)
    raise ValueError(f"unknown layer location {location!r}")


def build_plan(config: ModelConfig, locations: list[tuple], mtp: MTPLayout | None = None) -> dict[Path, LeafPlan]:
    """Expands the rule tables for one config; `locations[i]` is the place of HF layer i in the ring_jax tree.

    mtp: how the checkpoint names its MTP blocks (default: appended after the main stack, as ring_jax writes)."""
    mtp = mtp or MTPLayout("appended", config.num_hidden_layers, config.num_nextn_predict_layers)
    plans: dict[Path, LeafPlan] = {}

    def add(path: Path, piece: Piece) -> None:
        plans.setdefault(path, LeafPlan(path)).pieces.append(piece)

    for rule in MODEL_RULES:
        add(_split(rule.ring), Piece(rule.hf, (), rule.transform))
    layers = [(i, f"model.layers.{i}.", *layer_prefix(location)) for i, location in enumerate(locations)]
    for depth in range(config.num_nextn_predict_layers):
        prefix = mtp.block_prefix(depth)
        layers.append((config.num_hidden_layers + depth, prefix, ("mtp_layers", depth, "layer"), ()))
        for rule in MTP_RULES:
            add(("mtp_layers", depth, *_split(rule.ring)), Piece(prefix + rule.hf, (), rule.transform))
    for layer, hf_prefix, prefix, stack_index in layers:
        for rule in LAYER_RULES:
            path = prefix + _split(rule.ring)
            if not rule.when(config, layer):
                continue
            if not rule.stored(config):
                plans.setdefault(path, LeafPlan(path)).fill_absent = rule.fill_absent
                continue
            hf = hf_prefix + rule.hf
            if rule.per_expert:
                for e in range(config.num_experts):
                    add(path, Piece(hf.format(e=e), (*stack_index, e), rule.transform))
            else:
                add(path, Piece(hf, stack_index, rule.transform))
    return plans


def is_ignored_hf_name(name: str) -> bool:
    """Names that hold no weights: non-persistent buffers some exporters keep."""
    return any(part in name for part in IGNORED_HF_SUBSTRINGS)
