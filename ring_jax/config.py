"""Model configuration: one table of fields, the ml-collections `model` section built from it, and its validated,
frozen form `ModelConfig`.

Every model field is declared once, below, as a `ModelConfig` dataclass field with its default (Ring-mini-linear-2.0's
value), its type and a one-line meaning, and one of three kinds:

- ``hf``: an architecture field of the HF ``config.json`` (same name), copied 1:1 by the converter;
- ``architecture``: a ring_jax-only architecture choice (changes the function the model computes);
- ``runtime``: how the same function is computed or trained (dtypes, kernels, layer scan, remat, loss weights);
  may change between runs of one model.

`model_defaults()`, the HF mapping (`ring_jax.convert.hf_config`), resume checks and the README's field table are
all derived from these declarations. `ModelConfig.from_config` validates every cross-field rule once, before anything
is traced, and names the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from pallas_kernels.attention.api import ATTENTION
from pallas_kernels.fp8.api import NATIVE_IMPLEMENTATIONS
from pallas_kernels.gmm.api import GROUPED_MATMUL
from pallas_kernels.lightning.api import LIGHTNING_DECODE, LIGHTNING_FORWARD
from ring_jax.errors import ConfigError
from ring_jax.remat import REMAT_POLICIES

__all__ = ["ConfigError", "ModelConfig", "model_defaults", "model_fields", "fields_table_markdown"]

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("linear", "yarn")
# "native" takes the platform's kernel order (pallas_kernels.fp8.api); a route's name picks that kernel.
FP8_MODES = ("none", "emulated", "native", *NATIVE_IMPLEMENTATIONS)
FIELD_KINDS = ("hf", "architecture", "runtime")
REQUIRED = "required"  # `when_missing` of an HF field that config.json must contain


def _field(kind: str, default: Any, doc: str, *, choices: tuple | None = None, when_missing: Any = REQUIRED,
           none_type: type | None = None) -> Any:  # fmt: skip
    """A ModelConfig field. choices: allowed values (validated); when_missing (hf fields): value used when an HF
    config.json lacks the field (REQUIRED: it must be there; None: derived, see `hf_config`); none_type: the type a
    None default holds when set (ml-collections placeholders need it)."""
    metadata = {"kind": kind, "doc": doc, "choices": choices, "when_missing": when_missing, "none_type": none_type}
    return dataclasses.field(default=default, metadata=metadata)


def _hf(default: Any, doc: str, **kwargs: Any) -> Any:
    return _field("hf", default, doc, **kwargs)


def _architecture(default: Any, doc: str, **kwargs: Any) -> Any:
    return _field("architecture", default, doc, **kwargs)


def _runtime(default: Any, doc: str, **kwargs: Any) -> Any:
    return _field("runtime", default, doc, **kwargs)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Validated, immutable model configuration (hashable: usable as a jit static argument)."""

    # --- HF config.json architecture fields (same names) ---
    vocab_size: int = _hf(157184, "vocabulary size (embedding rows, lm_head columns)")
    hidden_size: int = _hf(2048, "model width")
    num_hidden_layers: int = _hf(20, "decoder layers L")
    num_attention_heads: int = _hf(16, "query heads H (and key/value heads of lightning layers)")
    num_key_value_heads: int = _hf(4, "key/value heads of softmax (GQA) layers", when_missing=None)
    head_dim: int = _hf(128, "width D of every attention head", when_missing=None)
    intermediate_size: int = _hf(5120, "SwiGLU width of the dense layers")
    moe_intermediate_size: int = _hf(512, "SwiGLU width of each routed expert")
    moe_shared_expert_intermediate_size: int = _hf(512, "SwiGLU width of each shared expert")
    num_experts: int = _hf(256, "routed experts per MoE layer")
    num_experts_per_tok: int = _hf(8, "experts chosen per token (top-k)")
    num_shared_experts: int = _hf(1, "always-on shared experts per MoE layer")
    n_group: int = _hf(8, "expert groups of the group-limited top-k")
    topk_group: int = _hf(4, "groups kept per token before the top-k")
    routed_scaling_factor: float = _hf(2.5, "multiplier of the normalised routing weights")
    norm_topk_prob: bool = _hf(True, "normalise the top-k routing weights to sum 1")
    score_function: str = _hf("sigmoid", "router score function", choices=("sigmoid",), when_missing="sigmoid")
    moe_router_enable_expert_bias: bool = _hf(True, "aux-loss-free expert bias used in expert selection")
    first_k_dense_replace: int = _hf(1, "leading layers with a dense MLP instead of the MoE")
    layer_group_size: int = _hf(5, "G: every G-th layer (and the tail after the last full group) is softmax")
    group_norm_size: int = _hf(4, "groups of the lightning output RMSNorm")
    partial_rotary_factor: float = _hf(0.5, "fraction of head_dim that gets RoPE (NeoX style)")
    rope_theta: float = _hf(1_000_000.0, "RoPE base")
    rope_scaling: tuple[tuple[str, Any], ...] | None = _hf(
        None, "RoPE scaling dict (linear or yarn) or null", when_missing=None, none_type=dict
    )
    max_position_embeddings: int = _hf(131072, "longest sequence the positions are trained for")
    rms_norm_eps: float = _hf(1e-6, "epsilon of every RMSNorm")
    use_qk_norm: bool = _hf(True, "per-head RMSNorm on q and k before RoPE")
    num_nextn_predict_layers: int = _hf(0, "multi-token-prediction (MTP) blocks", when_missing=0)
    tie_word_embeddings: bool = _hf(False, "must be false: separate lm_head", choices=(False,), when_missing=False)
    linear_silu: bool = _hf(False, "must be false: identity feature map on lightning q/k/v", choices=(False,),
                            when_missing=False)  # fmt: skip
    use_bias: bool = _hf(False, "must be false: no projection biases", choices=(False,), when_missing=False)
    use_qkv_bias: bool = _hf(False, "must be false: no qkv bias", choices=(False,), when_missing=False)
    # --- ring_jax-only architecture fields ---
    decay_layer_offset: float = _architecture(
        1, "δ in the lightning layer factor 1 − (l − δ)/(L − 1) + 1e−5: 1 = HF remote code, 0 = SGLang/vLLM"
    )
    # --- runtime choices: the same function, computed or trained differently ---
    attention_layout: str = _architecture(
        "hybrid", "hybrid: the Ring-linear layer plan; softmax: every layer GQA softmax of the same sizes (baseline)",
        choices=("hybrid", "softmax"),
    )
    mtp_loss_scaling_factor: float = _runtime(0.1, "weight of the MTP loss (with num_nextn_predict_layers > 0)")
    dtype: str = _runtime("float32", "compute dtype", choices=SUPPORTED_DTYPES)
    param_dtype: str = _runtime("float32", "parameter (master weight) dtype", choices=SUPPORTED_DTYPES)
    scan_layers: bool = _runtime(True, "scan over layer cycles (True) or unroll them: same weights, same results")
    remat_policy: str = _runtime("none", "activation checkpointing of each decoder layer", choices=REMAT_POLICIES)
    lightning_implementation: str | None = _runtime(
        None, "lightning forward kernel; None = per-platform order", choices=LIGHTNING_FORWARD.choices(),
        none_type=str,
    )  # fmt: skip
    lightning_decode_implementation: str | None = _runtime(
        None, "lightning decode-step kernel; None = per-platform order", choices=LIGHTNING_DECODE.choices(),
        none_type=str,
    )  # fmt: skip
    gmm_implementation: str | None = _runtime(
        None, "expert grouped matmul; None = per-platform order", choices=GROUPED_MATMUL.choices(), none_type=str
    )
    attention_implementation: str | None = _runtime(
        None, "softmax attention kernel; None = per-platform order", choices=ATTENTION.choices(), none_type=str
    )
    fp8: str = _runtime(
        "none", "blockwise FP8 for the projections and expert GEMMs: none, emulated (any platform), native (GPU: the "
        "platform's kernel route), or a route by name",
        choices=FP8_MODES,
    )
    expert_parallel_transport: str | None = _runtime(
        None, "how tokens reach experts on other devices (mesh.expert > 1); None = by expert-group size",
        choices=(None, "all_gather", "all_to_all", "ragged_all_to_all"), none_type=str,
    )  # fmt: skip

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict | Mapping[str, Any]) -> ModelConfig:
        """Builds and validates from a `config.model` section; raises ConfigError naming the field.

        HF fields must all be present; ring_jax-only fields missing from `section` (e.g. a config saved before the
        field existed) take their defaults."""
        values = dict(section.to_dict() if isinstance(section, ml_collections.ConfigDict) else section)
        fields = model_fields()
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: unknown model field (known: {', '.join(sorted(fields))})")
        missing = sorted(name for name, f in fields.items() if name not in values and f.metadata["kind"] == "hf")
        if missing:
            raise ConfigError(f"model.{missing[0]}: required model field is missing")
        scaling = values.get("rope_scaling")
        values["rope_scaling"] = None if scaling is None else tuple(sorted(dict(scaling).items()))
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **changes: Any) -> ModelConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return values

    def architecture(self) -> dict[str, Any]:
        """The values of the fields that define the function computed (kinds hf and architecture)."""
        kinds = {name: f.metadata["kind"] for name, f in model_fields().items()}
        return {name: value for name, value in self.to_dict().items() if kinds[name] != "runtime"}


    # ----------------------------------------------------------------------------------------------------------
    # Derived quantities.
    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_softmax_layer(self, layer: int) -> bool:
        """Every G-th layer is softmax attention, and so is every tail layer past the last full group (all of them
        with attention_layout="softmax")."""
        if self.attention_layout == "softmax":
            return True
        group = self.layer_group_size
        return (layer + 1) % group == 0 or layer >= (self.num_hidden_layers // group) * group

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(field: str, message: str) -> None:
            raise ConfigError(f"model.{field}: {message}")

        for name in model_fields():  # NaN/Inf pass every comparison below: refuse them first
            value = getattr(self, name)
            numbers = dict(value).values() if name == "rope_scaling" and value is not None else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                fail(name, f"must be a finite number, got {value!r}")
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
            "n_group", "topk_group", "layer_group_size", "group_norm_size",
            "max_position_embeddings",
        )  # fmt: skip
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, f"must be a positive integer, got {value!r}")
        for field in ("num_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, field) < 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if self.num_shared_experts > 0 and self.moe_shared_expert_intermediate_size <= 0:
            fail("moe_shared_expert_intermediate_size", "must be positive when num_shared_experts > 0")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})",
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"exceeds num_hidden_layers ({self.num_hidden_layers})")
        if self.layer_group_size > self.num_hidden_layers:
            fail(
                "layer_group_size",
                f"layer_group_size ({self.layer_group_size}) is not compatible with num_hidden_layers "
                f"({self.num_hidden_layers}): it must not exceed the number of layers",
            )
        if self.num_experts % self.n_group:
            fail("n_group", f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            fail("topk_group", f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        experts_in_kept_groups = self.topk_group * (self.num_experts // self.n_group)
        if self.num_experts_per_tok > experts_in_kept_groups:
            fail(
                "num_experts_per_tok",
                f"top-k ({self.num_experts_per_tok}) is larger than the {experts_in_kept_groups} experts in "
                f"topk_group ({self.topk_group}) groups of {self.num_experts // self.n_group}",
            )
        width = self.num_attention_heads * self.head_dim
        if width % self.group_norm_size:
            fail(
                "group_norm_size",
                f"num_attention_heads * head_dim ({width}) must be divisible by group_norm_size "
                f"({self.group_norm_size})",
            )
        rotary = self.head_dim * self.partial_rotary_factor
        if not 0.0 < self.partial_rotary_factor <= 1.0 or rotary != int(rotary) or int(rotary) % 2:
            fail("partial_rotary_factor", f"head_dim * factor must be an even integer in (0, head_dim], got {rotary}")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ROPE_SCALING_TYPES:
                fail("rope_scaling", f"rope type {kind!r} is not supported (supported: {ROPE_SCALING_TYPES})")
            if not scaling.get("factor", 0) >= 1.0:
                fail("rope_scaling", f"factor must be >= 1, got {scaling.get('factor')!r}")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        for name, field in model_fields().items():
            allowed = field.metadata["choices"]
            value = getattr(self, name)
            if allowed is not None and value not in allowed:
                if len(allowed) == 1:
                    fail(name, f"{value!r} is not supported (Ring-linear models use {allowed[0]!r})")
                fail(name, f"must be one of {allowed}, got {value!r}")
        if not math.isfinite(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be a positive finite number")


def model_fields() -> dict[str, dataclasses.Field]:
    """Every model field by name, in declaration order; `.metadata` holds kind, doc, choices, when_missing."""
    return {field.name: field for field in dataclasses.fields(ModelConfig)}


def model_defaults() -> ml_collections.ConfigDict:
    """The `model` section of a config: every field of `ModelConfig` at its default (Ring-mini-linear-2.0)."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict({
        name: placeholder(field.metadata["none_type"]) if field.default is None else field.default
        for name, field in model_fields().items()
    })


def fields_table_markdown() -> str:
    """The README's table of model fields (name, kind, default, meaning), generated from the declarations."""
    lines = ["| field | kind | default | meaning |", "|---|---|---|---|"]
    for name, field in model_fields().items():
        default = "None" if field.default is None else repr(field.default)
        lines.append(f"| `{name}` | {field.metadata['kind']} | `{default}` | {field.metadata['doc']} |")
    return "\n".join(lines)

