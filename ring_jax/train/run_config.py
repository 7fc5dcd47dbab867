"""The run's `WORKDIR/config.json`: compared with the new config before a resume, then rewritten atomically.

Resuming with another architecture would restore weights into a different model (or fail deep inside Orbax), so
fields that define the model are compared first: any difference is a ConfigError naming each field (old -> new),
raised before anything is written. Runtime choices (steps, learning rate, mesh, data, dtypes, kernels) may change
between runs and are listed in one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from ring_jax.config import model_fields
from ring_jax.errors import ConfigError

CONFIG_FILE = "config.json"  # the resolved training config, under the workdir
_MISSING = "<absent>"


def is_architecture_field(dotted: str) -> bool:
    """True for a model field of kind hf or architecture (it defines the model's weights or function); false for
    runtime model fields (dtypes, kernels, scan, remat, loss weights) and every training section."""
    section, _, name = dotted.partition(".")
    field = model_fields().get(name) if section == "model" else None
    return field is not None and field.metadata["kind"] != "runtime"


def _fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """'section.field' -> value (a value such as model.rope_scaling is compared whole)."""
    return {f"{section}.{name}": value for section, fields in config.items() for name, value in fields.items()}


def _saved_default(dotted: str) -> Any:
    """What a config saved before a model field existed meant by it: the field's default (as ModelConfig fills in)."""
    section, _, name = dotted.partition(".")
    field = model_fields().get(name) if section == "model" else None
    return _MISSING if field is None else json.loads(json.dumps(field.default))


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(architecture changes, runtime changes) between two config dicts, each 'field: old -> new'."""
    old_flat, new_flat = _fields(saved), _fields(new)
    architecture, runtime = [], []
    for field in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(field, _saved_default(field)), new_flat.get(field, _MISSING)
        if old != value:
            (architecture if is_architecture_field(field) else runtime).append(f"{field}: {old!r} -> {value!r}")
    return architecture, runtime


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Compares `config` with the run's saved config.json; returns the runtime changes (maybe none).

    Raises ConfigError naming every architecture field that differs, or when config.json cannot be read. Without a
    config.json (a workdir from elsewhere) nothing is compared; the checkpoint's shapes are still checked on restore.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: cannot be read to check the resumed architecture ({e}); restore it, or delete "
            f"it to resume without that check"
        ) from None
    architecture, runtime = config_changes(saved, _as_json(config))
    if architecture:
        raise ConfigError(
            f"resuming {workdir} with a different architecture: {'; '.join(architecture)} "
            f"(use another --workdir, or the saved values)"
        )
    return runtime


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config as `workdir/config.json` (whole or not at all)."""
    path = os.path.join(workdir, CONFIG_FILE)
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run saved as WORKDIR/config.json (one-line error when missing or invalid)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (is {workdir!r} a training workdir?)")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
        raise ValueError(f"{path}: expected a training config with a 'model' section")
    return ml_collections.ConfigDict(values)
