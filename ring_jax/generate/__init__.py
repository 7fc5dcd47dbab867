"""Text generation with the hybrid cache: `generate(model, prompts, GenerationConfig(...))`.

CLI: `python -m ring_jax.generate (--workdir DIR | --hf HF_DIR) --prompt TEXT [...]` (see `ring_jax.generate.cli`).
"""

from ring_jax.generate.engine import Completion, GenerationConfig, generate
from ring_jax.generate.loading import load_model_and_tokenizer
from ring_jax.generate.sampling import SamplingParams, sample_tokens

__all__ = [
    "Completion",
    "GenerationConfig",
    "SamplingParams",
    "generate",
    "load_model_and_tokenizer",
    "sample_tokens",
]
