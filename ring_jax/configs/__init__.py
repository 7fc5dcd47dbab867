"""Training configs shipped with the package: `default` (a tiny model on the embedded data), `ring_mini_linear_2` and
`ring_flash_linear_2` (the released models). Each module's `get_config()` returns a full ml-collections config.

`train.py --config=configs/NAME.py` reads the files of the repository's `configs/` folder, which re-export these, so
the same configs are importable from an installed package (`from ring_jax.configs import default`)."""
