"""XLA options that let a multi-GPU step overlap its collectives with compute.

Without the latency-hiding scheduler, XLA:GPU runs the gradient all-reduce (data), the weight all-gathers and
gradient reduce-scatters (fsdp) and the token exchanges (expert) where they fall, and the scanned layer cycles
finish their whole backward pass before the first gradient leaves the device. These options schedule collectives
asynchronously around compute and pipeline them across the iterations of the layer scan. They are set through
`XLA_FLAGS` (read once, when JAX starts its backends) and only where the user has not set the same option; other
backends ignore them.
"""

from __future__ import annotations

import os

GPU_OVERLAP_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
}


def set_default_xla_flags() -> None:
    """Adds GPU_OVERLAP_FLAGS to `XLA_FLAGS` (keeping any the user set). Call before JAX initialises devices."""
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in GPU_OVERLAP_FLAGS.items() if f"--{name}=" not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
