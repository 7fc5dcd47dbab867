"""The ring_jax model checkpoint written by `from-hf` and read by `to-hf`, fine-tuning and generation.

Layout of a checkpoint directory:
    ring_jax_model.json  {"format", "model": config.model fields, "hf_passthrough": inert config.json fields}
    state/               Orbax StandardCheckpointer save of the persistent model state (nnx.Param and
                         ExpertBias leaves) as a nested pure dict with string keys, e.g.
                         ["cycles"]["layers"]["0"]["attention"]["qkv"]["kernel"] [num_cycles, hidden, 3*H*D];
                         ExpertLoad scratch is not saved.
    hf_assets/           tokenizer / generation / remote-code files of the HF source, copied back by to-hf.
Restoring goes straight onto the NamedShardings of a mesh when one is given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from ring_jax.config import ModelConfig, model_defaults
from ring_jax.convert.safetensors_io import CheckpointError, PlannedTensor
from ring_jax.convert.transfer import PERSISTENT, export_tensors, model_plan, split_abstract
from ring_jax.model import RingLinearModel
from ring_jax.sharding import state_shardings

FORMAT = "ring_jax.model/1"
METADATA_FILE = "ring_jax_model.json"
STATE_DIR = "state"
ASSETS_DIR = "hf_assets"


def refuse_existing(dst: str | Path, overwrite: bool) -> None:
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(
            f"{Path(dst).absolute()} already exists (pass overwrite=True / --overwrite to replace it)"
        )


@contextmanager
def atomic_directory(dst: str | Path, *, overwrite: bool = False):
    """Yields a temporary directory beside `dst`; on success it is renamed to `dst`, on failure removed.

    An existing `dst` is an error unless `overwrite`; then it is replaced only once the new one is complete.
    """
    dst = Path(dst).absolute()
    refuse_existing(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model: RingLinearModel, directory: Path, hf_passthrough: dict | None = None) -> None:
    """Writes the model state and metadata into an existing (empty, temporary) `directory`."""
    state = nnx.to_pure_dict(nnx.state(model, PERSISTENT))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / STATE_DIR, _str_keys(state))
        checkpointer.wait_until_finished()
    metadata = {"format": FORMAT, "model": model.config.to_dict(), "hf_passthrough": hf_passthrough or {}}
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")


def read_metadata(directory: str | Path) -> dict[str, Any]:
    file = Path(directory) / METADATA_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; {directory} is not a ring_jax model checkpoint (from-hf output)")
    metadata = json.loads(file.read_text())
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {metadata.get('format')!r}, this ring_jax reads {FORMAT!r}")
    return metadata


def checkpoint_config(directory: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with; `overrides` change ring_jax fields such as dtype."""
    section = model_defaults()
    section.update(read_metadata(directory)["model"])
    section.update(overrides)
    return ModelConfig.from_config(section)


def load_checkpoint(
    directory: str | Path, *, mesh: Mesh | None = None, config: ModelConfig | None = None
) -> RingLinearModel:
    """Restores a model from `directory`, optionally with a different `config` (e.g. another param_dtype:
    Orbax casts). With `mesh`, every leaf is restored straight into its NamedSharding."""
    directory = Path(directory).absolute()
    config = config or checkpoint_config(directory)
    graphdef, abstract_params, abstract_rest = split_abstract(config)
    leaves = nnx.to_pure_dict(abstract_params)
    if mesh is not None:
        shardings = _pure(state_shardings(abstract_params, mesh))
    else:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), leaves)
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        leaves,
        shardings,
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / STATE_DIR, _str_keys(target))
    nnx.replace_by_pure_dict(abstract_params, _int_keys(restored, leaves))
    rest = jax.tree.map(lambda leaf: jax.numpy.zeros(leaf.shape, leaf.dtype), abstract_rest)
    return nnx.merge(graphdef, abstract_params, rest)


def _pure(state: Any) -> Any:
    return state.to_pure_dict() if hasattr(state, "to_pure_dict") else state


def _str_keys(tree: Any) -> Any:
    """Orbax stores nested dicts; list indices become string keys."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _int_keys(tree: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _int_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


class CheckpointLeaves:
    """Reads leaves of an Orbax checkpoint on demand, one batch of about `batch_bytes` at a time (partial restore),
    holding only the current batch: `leaves(path)` -> array. Ask for paths in `order` to read each batch once.

    state_dir: the Orbax item directory; stored_key(path): a leaf's key path in it (default: the path's parts as
    strings, the layout of a model checkpoint's state/)."""

    def __init__(self, state_dir: Path, abstract: dict[tuple, jax.ShapeDtypeStruct], order: list, batch_bytes: int,
                 stored_key: Callable[[tuple], tuple[str, ...]] = lambda path: tuple(map(str, path))):  # fmt: skip
        self._state_dir = Path(state_dir).absolute()
        self._stored_key = stored_key
        self._abstract = abstract
        self._batches: list[list[tuple]] = [[]]
        size = 0
        for path in order:
            nbytes = abstract[path].size * abstract[path].dtype.itemsize
            if self._batches[-1] and size + nbytes > batch_bytes:
                self._batches.append([])
                size = 0
            self._batches[-1].append(path)
            size += nbytes
        self._batch_of = {path: i for i, batch in enumerate(self._batches) for path in batch}
        self._current: tuple[int, dict] = (-1, {})

    def __call__(self, path: tuple) -> jax.Array:
        index = self._batch_of[path]
        if index != self._current[0]:
            self._current = (-1, {})  # drop the previous batch before reading the next
            self._current = (index, self._restore(self._batches[index]))
        return self._current[1][path]

    def _restore(self, paths: list[tuple]) -> dict:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target: dict = {}
        for path in paths:
            node = target
            *parents, name = self._stored_key(path)
            for key in parents:
                node = node.setdefault(key, {})
            leaf = self._abstract[path]
            node[name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding), target)
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                self._state_dir,
                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            )
        values = {}
        for path in paths:
            node = restored
            for key in self._stored_key(path):
                node = node[key]
            values[path] = node
        return values


def checkpoint_tensors(
    directory: str | Path, *, dtype: Any = None, batch_bytes: int
) -> tuple[ModelConfig, list[PlannedTensor]]:
    """A checkpoint's weights as HF-named tensors, streamed: only about `batch_bytes` of ring_jax leaves are
    held at a time, so peak host memory is about one batch plus one output shard, not the model."""
    config = checkpoint_config(directory)
    _, params, _ = split_abstract(config)
    abstract = {path: variable.get_value() for path, variable in nnx.to_flat_state(params)}
    order = list(model_plan(config, params))
    leaves = CheckpointLeaves(Path(directory) / STATE_DIR, abstract, order, batch_bytes)
    return config, export_tensors(config, params, leaves, dtype=dtype, order="leaf")
