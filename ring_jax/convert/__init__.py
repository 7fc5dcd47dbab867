"""HF / PyTorch checkpoint conversion for Ring-linear models (name mapping as data in `mapping.py`).

CLI: `python -m ring_jax.convert from-hf --src HF_DIR --dst CKPT_DIR` and `... to-hf --src CKPT_DIR --dst
HF_DIR`.
"""

from ring_jax.convert.api import (
    checkpoint_to_hf,
    from_hf,
    from_torch_state_dict,
    hf_to_checkpoint,
    to_hf,
    to_torch_state_dict,
)
from ring_jax.convert.checkpoint import checkpoint_config, load_checkpoint
from ring_jax.convert.hf_config import HFConfigError
from ring_jax.convert.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError",
    "HFConfigError",
    "checkpoint_config",
    "checkpoint_to_hf",
    "from_hf",
    "from_torch_state_dict",
    "hf_to_checkpoint",
    "load_checkpoint",
    "to_hf",
    "to_torch_state_dict",
]
