"""Train a Ring-linear model.

    python train.py                                   # configs/default.py on the embedded data, runs/default
    python train.py --config=configs/default.py --workdir=runs/x --config.train.steps=100

Resumes from the latest checkpoint in --workdir. Writes config.json, metrics.jsonl, tensorboard/ and checkpoints/.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ring_jax.errors import RingJaxError
from ring_jax.train import distributed, init_from
from ring_jax.train.loop import NonFiniteError, train
from ring_jax.train.xla_flags import set_default_xla_flags

CONFIG_LOOKUP_ERRORS = (AttributeError, KeyError, TypeError, ValueError)  # what ml_collections raises for overrides


def _exit(message: str, code: int = 2) -> None:
    print(f"train: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _bad_override(error: Exception) -> None:
    """One line for an unknown `--config.a.b` field: the flag and ml_collections' 'Did you mean' hint."""
    message = error
    while isinstance(message, BaseException) and message.args:  # ml_collections nests the KeyError
        message = message.args[0]
    name, _, hint = str(message).partition("\n")
    name = name.strip("'\"")
    flag = next((arg for arg in sys.argv[1:] if arg.startswith("--config.") and name in arg.split("=")[0].split(".")),
                "a --config.* override")
    _exit(f"{flag}: no config field {name!r}" + (f" ({hint})" if hint else ""))


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit(f"{e}")
    except CONFIG_LOOKUP_ERRORS as e:
        _bad_override(e)


try:  # ml_collections applies --config.* overrides of the default config file while defining the flag
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.",
                                              lock_config=True)
except CONFIG_LOOKUP_ERRORS as _error:
    _bad_override(_error)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and the config.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "Join a multi-process job (jax.distributed.initialize): auto = when the flags "
                                 "below are given or SLURM / Open MPI / a TPU pod slice launched this process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process jobs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-process jobs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def _load_config():
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.isfile(path.split(":", 1)[0]):
        _exit(f"--config: no config file {path!r} (cwd {os.getcwd()})")
    try:
        config = _CONFIG.value
        config.get("train")  # a config file that failed to load raises on first access
    except OSError as e:
        cause = e.__cause__ or e
        _exit(f"--config: cannot load {path!r}: {type(cause).__name__}: {' '.join(str(cause).split())}")
    return config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = _load_config()
    set_default_xla_flags()
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    init_from.keep_overridden_model_fields(config, config_flags.get_override_values(flags.FLAGS["config"]))
    try:
        result = train(config, _WORKDIR.value)
    except NonFiniteError as e:
        _exit(str(e), code=3)
    except (RingJaxError, FileNotFoundError) as e:  # bad input (an init_from folder without config.json, ...) or a
        _exit(str(e))                               # locked workdir: one line, no traceback
    losses = result.losses
    if losses:
        first, last = min(losses), max(losses)
        print(f"train: steps {result.start_step}->{result.final_step}, loss {losses[first]:.4f} (step {first}) -> "
              f"{losses[last]:.4f} (step {last})", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
