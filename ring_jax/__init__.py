"""ring_jax: the Ring-linear hybrid (lightning + softmax attention) MoE LLM family in pure JAX."""

from ring_jax.config import ConfigError, ModelConfig, base_config, model_defaults
from ring_jax.model import ModelCache, ModelOutput, RingLinearModel, layer_locations

__all__ = [
    "ConfigError",
    "ModelCache",
    "ModelConfig",
    "ModelOutput",
    "RingLinearModel",
    "base_config",
    "layer_locations",
    "model_defaults",
]
