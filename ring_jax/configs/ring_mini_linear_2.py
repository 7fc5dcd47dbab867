"""Ring-mini-linear-2.0: 16.4B total / 1.6B activated (the values of the released config.json)."""

import ml_collections

from ring_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()  # model defaults are Ring-mini-linear-2.0's
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.train.seq_len = 4096
    config.train.batch_size = 64
    return config
