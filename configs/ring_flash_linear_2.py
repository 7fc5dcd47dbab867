"""`python train.py --config=configs/ring_flash_linear_2.py`: the config of `ring_jax.configs.ring_flash_linear_2`."""

from ring_jax.configs.ring_flash_linear_2 import get_config

__all__ = ["get_config"]
