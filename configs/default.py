"""`python train.py --config=configs/default.py`: the config of `ring_jax.configs.default`."""

from ring_jax.configs.default import get_config

__all__ = ["get_config"]
