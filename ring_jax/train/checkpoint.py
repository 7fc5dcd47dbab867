"""Orbax CheckpointManager wrapper: train state + grain iterator state, async saves, keep last K, no NaNs.

Orbax writes each step into a temporary directory and renames it on commit, so a process killed mid-save
leaves the previous checkpoint as the latest complete one; leftover temporaries are removed on the next start.
`restore_params` / `restore_model` read a training workdir's weights for inference, export or a warm start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.layers.moe import ExpertBias
from ring_jax.model import RingLinearModel
from ring_jax.sharding import state_shardings
from ring_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"  # under the workdir
CONFIG_FILE = "config.json"  # the resolved training config, under the workdir

log = logging.getLogger(__name__)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def all_finite(tree) -> bool:
    """True iff every floating-point leaf of `tree` is free of NaN/Inf (one fused reduction on device)."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]
    return not leaves or bool(_all_finite(leaves))


class Checkpointer:
    """Saves {'state': the TrainState as a dict of its fields, 'data': grain iterator} under `directory/<step>`."""

    def __init__(self, directory: str, *, every_n_steps: int, keep: int, async_save: bool = True):
        self._every_n_steps = every_n_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._every_n_steps > 0 and step % self._every_n_steps == 0

    def save(self, step: int, state, data_iterator: grain.DatasetIterator) -> bool:
        """Starts a (possibly async) save of `state` and the iterator position after `step` steps.

        Refuses (returns False, logs an error) when the state holds NaN/Inf: no checkpoint is ever poisoned.
        """
        if not all_finite(state):
            log.error("not saving step %d: the train state contains NaN/Inf", step)
            return False
        if self._manager.latest_step() == step:
            return True
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.to_checkpoint()),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state, data_iterator: grain.DatasetIterator):
        """Restores `step` into arrays shaped/sharded like `abstract_state` (a TrainState of ShapeDtypeStructs);
        moves `data_iterator` there."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state.to_checkpoint()),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return TrainState.from_checkpoint(restored["state"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ----------------------------------------------------------------------------------------------------------
# Weights of a training workdir, without the optimizer state.


class RestoredParams(NamedTuple):
    """step: the checkpoint's step; config: the workdir's resolved training config (its `model` section builds
    the model); params: nnx.State of the Params; expert_bias: nnx.State of the routing biases (needed for routing)."""

    step: int
    config: ml_collections.ConfigDict
    params: nnx.State
    expert_bias: nnx.State


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


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a training workdir (a checkpoints/ folder and the run's config.json)."""
    return os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def saved_step(workdir: str | os.PathLike, step: int | None = None) -> int:
    """`step` (default: the latest) among the complete checkpoints of WORKDIR/checkpoints (a save killed midway is
    never one); FileNotFoundError naming the directory when there is none or `step` is not saved."""
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    missing = f"{directory}: no complete checkpoint (train first, or wait for a save to finish)"
    if not os.path.isdir(directory):
        raise FileNotFoundError(missing)
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(directory, options=options, item_names=("state", "data")) as manager:
        steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(missing)
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint of step {step} (saved steps: {steps})")
    return steps[-1] if step is None else step


def state_directory(workdir: str | os.PathLike, step: int) -> Path:
    """The Orbax item directory holding the train state of a saved step."""
    return Path(workdir).absolute() / CHECKPOINT_DIR / str(step) / "state"


def stored_keys(params: nnx.State) -> dict[tuple, tuple[str, ...]]:
    """{model path: key path in a training checkpoint's state item} of every Param and ExpertBias leaf of `params`
    (a persistent model state): the TrainState field, the variable's path, its value's attribute."""
    keys = {}
    for path, variable in nnx.to_flat_state(params):
        field = "expert_bias" if isinstance(variable, ExpertBias) else "params"
        ((inner, _),) = jax.tree_util.tree_flatten_with_path(variable)[0]  # the variable's value leaf: ('value',)
        keys[path] = (field, *map(str, path), *(str(getattr(k, "name", getattr(k, "key", k))) for k in inner))
    return keys


def restore_params(workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None) -> RestoredParams:
    """Restores only the params and expert biases of a training checkpoint (the optimizer state is never read).

    step: a saved step (default: the latest complete one; a save killed midway is never picked). mesh: place the
    leaves by their logical axis names on this mesh (default: the default device). A workdir without a complete
    checkpoint, or without `step`, is a one-line error.
    """
    config = read_workdir_config(workdir)
    model_config = ModelConfig.from_config(config.model)
    step = saved_step(workdir, step)
    _, params, expert_bias, _ = nnx.split(nnx.eval_shape(lambda: _new_model(model_config)), nnx.Param, ExpertBias, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def placed(tree: nnx.State) -> nnx.State:  # each variable's value: a ShapeDtypeStruct with its sharding
        shardings = jax.tree.map(lambda _: device, tree, is_leaf=is_variable) if mesh is None else \
            state_shardings(tree, mesh)  # fmt: skip
        return jax.tree.map(lambda v, sharding: v.replace(jax.ShapeDtypeStruct(v.get_value().shape,
                                                                               v.get_value().dtype, sharding=sharding)),
                            tree, shardings, is_leaf=is_variable)  # fmt: skip

    target = {"params": placed(params), "expert_bias": placed(expert_bias)}
    restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding), target)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            state_directory(workdir, step),
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        )
    return RestoredParams(step, config, restored["params"], restored["expert_bias"])


def restore_model(
    workdir: str,
    step: int | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[RingLinearModel, ml_collections.ConfigDict]:
    """(model with a workdir checkpoint's weights, the workdir's config). overrides: `config.model` fields that do
    not change the weights' shapes (e.g. {"dtype": "bfloat16", "lightning_implementation": "reference"})."""
    restored = restore_params(workdir, step, mesh=mesh)
    section = restored.config.model.copy_and_resolve_references()
    section.update(dict(overrides or {}))
    model_config = ModelConfig.from_config(section)
    graphdef, _, _, rest = nnx.split(nnx.eval_shape(lambda: _new_model(model_config)), nnx.Param, ExpertBias, ...)
    rest = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), rest)  # expert-load counters
    return nnx.merge(graphdef, restored.params, restored.expert_bias, rest), restored.config


def _new_model(config: ModelConfig) -> RingLinearModel:
    return RingLinearModel(config, rngs=nnx.Rngs(0))
