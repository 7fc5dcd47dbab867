"""Session set-up of the model tests (helpers: `support.py`; shared fixtures: `pallas_kernels/testing.py`)."""

import jax

# The float64 NumPy reference is the truth: JAX's fp32 matmuls run at full precision on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
