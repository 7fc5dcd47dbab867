"""Model configuration: the ml-collections `model` section and its validated, frozen form.

The `model` section uses the field names of the HF `config.json` (spec §1.2) so that conversion is a plain copy; the
few ring_jax-only fields (dtypes, kernels, scan, the disputed decay offset) are listed in `RING_JAX_FIELDS`.
`ModelConfig.from_config` validates every cross-field rule once, before anything is traced, and names the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from pallas_kernels.attention.api import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from pallas_kernels.gmm.api import IMPLEMENTATIONS as GMM_IMPLEMENTATIONS
from pallas_kernels.lightning.api import FORWARD_IMPLEMENTATIONS

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
LIGHTNING_IMPLEMENTATIONS = (None, *FORWARD_IMPLEMENTATIONS)
ROPE_SCALING_TYPES = ("linear", "yarn")


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the dotted field name."""


def model_defaults() -> ml_collections.ConfigDict:
    """The `model` section with Ring-mini-linear-2.0 architecture values (spec §1.2) and ring_jax defaults."""
    return ml_collections.ConfigDict(
        {
            # --- HF config.json fields ---
            "vocab_size": 157184,
            "hidden_size": 2048,
            "num_hidden_layers": 20,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 5120,
            "moe_intermediate_size": 512,
            "moe_shared_expert_intermediate_size": 512,
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "num_shared_experts": 1,
            "n_group": 8,
            "topk_group": 4,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "first_k_dense_replace": 1,
            "layer_group_size": 5,
            "group_norm_size": 4,
            "partial_rotary_factor": 0.5,
            "rope_theta": 1_000_000.0,
            "rope_scaling": ml_collections.config_dict.placeholder(dict),
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6,
            "use_qk_norm": True,
            "num_nextn_predict_layers": 0,
            "tie_word_embeddings": False,
            "linear_silu": False,
            "use_bias": False,
            "use_qkv_bias": False,
            # --- ring_jax fields ---
            # Lightning decay layer offset δ in f_l = 1 - (l - δ)/(L - 1) + 1e-5 (spec §2.6 / §9.1): 1 is the HF
            # remote code's convention, 0 is SGLang/vLLM's.
            "decay_layer_offset": 1,
            "dtype": "float32",
            "param_dtype": "float32",
            "scan_layers": True,
            "lightning_implementation": ml_collections.config_dict.placeholder(str),
            "gmm_implementation": ml_collections.config_dict.placeholder(str),
            "attention_implementation": ml_collections.config_dict.placeholder(str),
            "mtp_loss_scaling_factor": 0.1,
        }
    )


RING_JAX_FIELDS = (
    "decay_layer_offset",
    "dtype",
    "param_dtype",
    "scan_layers",
    "lightning_implementation",
    "gmm_implementation",
    "attention_implementation",
    "mtp_loss_scaling_factor",
)


def base_config() -> ml_collections.ConfigDict:
    """The full config: the `model` section plus the training sections (train, optim, data, checkpoint, mesh, ...)."""
    from ring_jax.train.config import training_defaults

    config = ml_collections.ConfigDict()
    config.model = model_defaults()
    for name, section in training_defaults().items():
        config[name] = section
    return config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Validated, immutable model configuration (hashable: usable as a jit static argument)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    score_function: str
    moe_router_enable_expert_bias: bool
    first_k_dense_replace: int
    layer_group_size: int
    group_norm_size: int
    partial_rotary_factor: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    max_position_embeddings: int
    rms_norm_eps: float
    use_qk_norm: bool
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    linear_silu: bool
    use_bias: bool
    use_qkv_bias: bool
    decay_layer_offset: float
    dtype: str
    param_dtype: str
    scan_layers: bool
    lightning_implementation: str | None
    gmm_implementation: str | None
    attention_implementation: str | None
    mtp_loss_scaling_factor: float

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict | dict) -> ModelConfig:
        """Builds and validates from a `config.model` section; raises ConfigError naming the field."""
        values = dict(section.to_dict() if isinstance(section, ml_collections.ConfigDict) else section)
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: unknown model field (known: {', '.join(sorted(names))})")
        missing = sorted(names - set(values))
        if missing:
            raise ConfigError(f"model.{missing[0]}: required model field is missing")
        scaling = values["rope_scaling"]
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
        """Spec §1.3: every G-th layer is softmax attention, and so is every tail layer past the last full group."""
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

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            numbers = dict(value).values() if field.name == "rope_scaling" and value is not None else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                fail(field.name, f"must be finite, got {value!r}")
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
        if self.score_function != "sigmoid":
            fail("score_function", f"only 'sigmoid' routing is implemented, got {self.score_function!r}")
        for field in ("tie_word_embeddings", "linear_silu", "use_bias", "use_qkv_bias"):
            if getattr(self, field):
                fail(field, "True is not supported by Ring-linear checkpoints (spec §1.2)")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in SUPPORTED_DTYPES:
                fail(field, f"must be one of {SUPPORTED_DTYPES}, got {getattr(self, field)!r}")
        choices = {
            "lightning_implementation": LIGHTNING_IMPLEMENTATIONS,
            "gmm_implementation": GMM_IMPLEMENTATIONS,
            "attention_implementation": ATTENTION_IMPLEMENTATIONS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                fail(field, f"must be one of {allowed}, got {getattr(self, field)!r}")
        if not math.isfinite(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be a positive finite number")
