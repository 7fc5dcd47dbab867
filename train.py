"""Train a Ring-linear model.

    python train.py                                   # configs/default.py on the embedded data, runs/default
    python train.py --config=configs/default.py --workdir=runs/x --config.train.steps=100

Resumes from the latest checkpoint in --workdir. Writes config.json, metrics.jsonl, tensorboard/ and checkpoints/.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ring_jax.errors import RingJaxError
from ring_jax.train import distributed, init_from
from ring_jax.train.loop import NonFiniteError, train
from ring_jax.train.xla_flags import set_default_xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and the config.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "Join a multi-process job (jax.distributed.initialize): auto = when the flags "
                                 "below are given or SLURM / Open MPI / a TPU pod slice launched this process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process jobs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-process jobs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    set_default_xla_flags()
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    init_from.keep_overridden_model_fields(config, config_flags.get_override_values(flags.FLAGS["config"]))
    try:
        result = train(config, _WORKDIR.value)
    except NonFiniteError as e:
        print(f"train: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except (RingJaxError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    losses = result.losses
    if losses:
        first, last = min(losses), max(losses)
        print(f"train: steps {result.start_step}->{result.final_step}, loss {losses[first]:.4f} (step {first}) -> "
              f"{losses[last]:.4f} (step {last})", flush=True)


if __name__ == "__main__":
    app.run(main)
