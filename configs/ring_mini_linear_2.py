"""`python train.py --config=configs/ring_mini_linear_2.py`: the config of `ring_jax.configs.ring_mini_linear_2`."""

from ring_jax.configs.ring_mini_linear_2 import get_config

__all__ = ["get_config"]
