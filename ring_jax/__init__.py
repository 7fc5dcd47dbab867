"""ring_jax: the Ring-linear hybrid (lightning + softmax attention) MoE LLM family in pure JAX."""

from ring_jax.config import ModelConfig, model_defaults
from ring_jax.convert import from_hf, from_torch_state_dict, to_hf, to_torch_state_dict
from ring_jax.errors import ConfigError, RingJaxError
from ring_jax.model import ModelCache, ModelOutput, RingLinearModel, layer_locations

__all__ = [
    "ConfigError",
    "ModelCache",
    "ModelConfig",
    "ModelOutput",
    "RingJaxError",
    "RingLinearModel",
    "from_hf",
    "from_torch_state_dict",
    "layer_locations",
    "model_defaults",
    "to_hf",
    "to_torch_state_dict",
]
