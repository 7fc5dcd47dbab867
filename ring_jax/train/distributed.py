"""Several processes, one job: when and how `jax.distributed.initialize` is called.

One process per host (TPU VM pod slices, GPU hosts with all their GPUs) or per GPU (SLURM / MPI launches) joins the
job before JAX touches a device. The coordinator address, process count and process id come from flags, or from the
environment JAX itself understands (Cloud TPU metadata, SLURM, Open MPI, Kubernetes), whatever JAX's cluster
detection finds when they are left out.
"""

from __future__ import annotations

import os

import jax

MODES = ("auto", "on", "off")


def launched_as_one_of_several() -> bool:
    """True when the environment says this process is part of a multi-process launch."""
    env = os.environ
    counts = (env.get("SLURM_NTASKS"), env.get("OMPI_COMM_WORLD_SIZE"))
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return any(count is not None and count.isdigit() and int(count) > 1 for count in counts) or "," in hosts


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the multi-process job; returns whether `jax.distributed.initialize` was called.

    mode "auto": when any of the three values is given, or the environment shows a multi-process launch (SLURM,
    Open MPI, a TPU pod slice's worker list); "on": always (let JAX detect everything, e.g. on TPU VMs); "off":
    never. Must run before anything touches a device.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    given = coordinator_address is not None or num_processes is not None or process_id is not None
    if mode == "off" or (mode == "auto" and not given and not launched_as_one_of_several()):
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)  # fmt: skip
    return True
