"""HF exports of a training run: config.json, sharded safetensors (+ index) and the tokenizer files, ready for
PyTorch / vLLM / SGLang.

- During training, every `checkpoint.hf_export_every` steps: the live parameters to WORKDIR/hf/step_N (the last
  `checkpoint.keep` kept; single-process runs).
- Afterwards, any saved step of a workdir: `python -m ring_jax.convert to-hf --src WORKDIR [--step N]`
  (`workdir_to_hf`), streaming leaves from the checkpoint.

Tensors keep the weights' dtype (model.param_dtype; config.json's torch_dtype says which) unless a dtype is given;
expert biases stay fp32. The run's `checkpoint.init_from`, when it was an HF folder or a from-hf output, lends its
inert config.json fields (token ids, auto_map, …) and its tokenizer / generation / remote-code files; an HF
`data.tokenizer` lends the files of its folder (they win over the init_from ones).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.convert.api import DEFAULT_MAX_SHARD_SIZE, carried_over, parse_size, write_hf
from ring_jax.convert.checkpoint import CheckpointLeaves, atomic_directory, refuse_existing
from ring_jax.convert.safetensors_io import PlannedTensor, copy_assets
from ring_jax.convert.transfer import export_tensors, model_plan, split_abstract
from ring_jax.errors import ConfigError
from ring_jax.train import init_from
from ring_jax.train.checkpoint import (
    is_workdir,
    saved_step,
    state_directory,
    stored_keys,
)
from ring_jax.train.run_config import read_workdir_config
from ring_jax.train.state import TrainState

HF_EXPORT_DIR = "hf"  # in the workdir: hf/step_N
log = logging.getLogger(__name__)


def run_extras(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], list[Path]]:
    """(inert config.json fields, folders whose tokenizer / generation files are copied, later ones winning) of a
    run's config; sources that are no longer on this machine are skipped with a warning."""
    passthrough: dict[str, Any] = {}
    folders: list[Path] = []
    if config.checkpoint.init_from:
        source = init_from.local_path(config.checkpoint.init_from)
        if source is None:
            log.warning("checkpoint.init_from=%r is not on this machine: the export carries no token ids or files "
                        "from it", config.checkpoint.init_from)  # fmt: skip
        elif is_workdir(source):  # fine-tuned from another run: what that run carried
            passthrough, folders = run_extras(read_workdir_config(source))
        else:
            passthrough, assets = carried_over(source)
            folders += [assets] if assets is not None else []
    if config.data.tokenizer != "bytes":
        tokenizer = Path(config.data.tokenizer).expanduser()
        if tokenizer.is_file():
            folders.append(tokenizer.parent)
        else:
            log.warning("data.tokenizer=%r is not on this machine: the export has no tokenizer files",
                        config.data.tokenizer)  # fmt: skip
    return passthrough, folders


def write_export(
    tensors: list[PlannedTensor],
    model_config: ModelConfig,
    dst: str | Path,
    config: ml_collections.ConfigDict,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Writes an HF directory at `dst` (atomically) with `tensors` and the run's extras (`run_extras`)."""
    passthrough, folders = run_extras(config)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        write_hf(tensors, model_config, tmp, max_shard_size=max_shard_size, hf_passthrough=passthrough,
                 progress=progress)  # fmt: skip
        for folder in folders:
            copy_assets(folder, tmp)


def state_tensors(state: TrainState, model_config: ModelConfig, persistent: nnx.State,
                  dtype: str | None = None) -> list[PlannedTensor]:  # fmt: skip
    """The HF tensors of a live train state (each gathered from its devices when written); persistent: the abstract
    persistent state of `model_config` (`transfer.split_abstract`)."""
    leaves = {path: variable.get_value() for tree in (state.params, state.expert_bias)
              for path, variable in nnx.to_flat_state(tree)}  # fmt: skip
    return export_tensors(model_config, persistent, leaves.__getitem__, dtype=dtype)


class HFExporter:
    """Exports the live state every `checkpoint.hf_export_every` steps to WORKDIR/hf/step_N, keeping the last
    `checkpoint.keep`."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, model_config: ModelConfig):
        if jax.process_count() > 1:
            raise ConfigError(
                "checkpoint.hf_export_every: exports during training need a single-process run; export "
                "a saved step with `python -m ring_jax.convert to-hf --src WORKDIR --step N`"
            )
        self.every = config.checkpoint.hf_export_every
        self._root = Path(workdir) / HF_EXPORT_DIR
        self._config = config
        self._model_config = model_config
        self._persistent = split_abstract(model_config)[1]  # built here: the loop runs under a mesh context
        self._keep = config.checkpoint.keep

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def export(self, step: int, state: TrainState) -> Path:
        dst = self._root / f"step_{step}"
        tensors = state_tensors(state, self._model_config, self._persistent)
        write_export(tensors, self._model_config, dst, self._config, overwrite=True,
                     progress=False)  # fmt: skip
        exports = sorted(self._root.glob("step_*"), key=lambda path: int(path.name.removeprefix("step_")))
        for old in exports[: -self._keep]:
            shutil.rmtree(old)
        print(f"export: wrote step {step} to {dst}", flush=True)
        return dst


def workdir_to_hf(
    workdir: str | Path,
    dst: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Writes a saved step of a training workdir (default: the latest complete one) as an HF directory; returns the
    step. Streams: about one shard's worth of leaves is read from the checkpoint at a time."""
    refuse_existing(dst, overwrite)
    config = read_workdir_config(workdir)
    step = saved_step(workdir, step)
    model_config = ModelConfig.from_config(config.model)
    _, persistent, _ = split_abstract(model_config)
    abstract = {path: variable.get_value() for path, variable in nnx.to_flat_state(persistent)}
    batch_bytes = parse_size(max_shard_size)
    leaves = CheckpointLeaves(state_directory(workdir, step), abstract, list(model_plan(model_config, persistent)),
                              batch_bytes, stored_keys(persistent).__getitem__)  # fmt: skip
    tensors = export_tensors(model_config, persistent, leaves, dtype=dtype, order="leaf")
    write_export(tensors, model_config, dst, config, max_shard_size=batch_bytes, overwrite=overwrite,
                 progress=progress)  # fmt: skip
    return step


def make_exporter(workdir: str, config: ml_collections.ConfigDict, model_config: ModelConfig) -> HFExporter | None:
    return HFExporter(workdir, config, model_config) if config.checkpoint.hf_export_every else None
