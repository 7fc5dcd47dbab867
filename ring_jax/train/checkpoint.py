"""Orbax CheckpointManager wrapper: train state + grain iterator state, async saves, keep last K, no NaNs.

Orbax writes each step into a temporary directory and renames it on commit, so a process killed mid-save
leaves the previous checkpoint as the latest complete one; leftover temporaries are removed on the next start.
`restore_params` / `restore_model` read a training workdir's weights for inference, export or a warm start.

Resume (`restore_latest`) takes the newest step that restores. A step is skipped, with a one-line warning naming it
and the reason, when Orbax's commit markers or metadata are missing or its restore fails (a truncated data file, a
deleted manifest or iterator state, an emptied folder). Skipped steps are never deleted: those newer than the
restored step are moved to `checkpoints_damaged/` (this run writes those step numbers again), older ones stay.
A checkpoint whose array shapes differ from the model's is not damage but another architecture: ResumeError names
the first mismatching parameter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from ring_jax.config import ModelConfig
from ring_jax.errors import RingJaxError
from ring_jax.layers.moe import ExpertBias
from ring_jax.model import RingLinearModel
from ring_jax.sharding import state_shardings
from ring_jax.train.run_config import CONFIG_FILE, read_workdir_config
from ring_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"  # under the workdir

log = logging.getLogger(__name__)

DAMAGED_DIR = "checkpoints_damaged"
_ITEMS = ("state", "data")


class ResumeError(RingJaxError):
    """The workdir's checkpoints cannot be resumed: none restores, or they hold another architecture."""


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def all_finite(tree) -> bool:
    """True iff every floating-point leaf of `tree` is free of NaN/Inf (one fused reduction on device)."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]
    return not leaves or bool(_all_finite(leaves))


def has_checkpoints(directory: str) -> bool:
    """True if `directory` holds a committed step folder (Orbax names them by the step; temporaries differ)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0] or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _path_name(path) -> str:
    return ".".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _shapes(tree) -> dict[str, tuple[int, ...] | None]:
    """Dotted leaf path -> shape, for a state pytree and for Orbax's metadata tree alike."""
    return {_path_name(path): getattr(leaf, "shape", None) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _shape_text(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _first_shape_mismatch(saved: dict, expected: dict) -> str | None:
    """Names the first parameter whose saved shape differs from the expected one (or that exists on one side);
    model parameters are looked at before optimizer moments and the rest."""
    for name, shape in sorted(expected.items(), key=lambda item: not item[0].startswith("params.")):
        shown = name.removesuffix(".value")
        if name not in saved:
            return f"it has no {shown} (the model expects {_shape_text(shape)})"
        if saved[name] is not None and shape is not None and tuple(saved[name]) != tuple(shape):
            return f"it holds {shown} as {_shape_text(saved[name])} but the model expects {_shape_text(shape)}"
    extra = next((name for name in saved if name not in expected), None)
    if extra is not None:
        return f"it holds {extra.removesuffix('.value')}, which the model does not have"
    return None


def _all_processes(flag: bool) -> bool:
    """True on every process iff `flag` is true on all of them (every host must pick the same step)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


class Checkpointer:
    """Saves {'state': the TrainState as a dict of its fields, 'data': grain iterator} under `directory/<step>`."""

    def __init__(self, directory: str, *, every_n_steps: int, keep: int, async_save: bool = True):
        self._every_n_steps = every_n_steps
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        # Handlers given up front (not on first use) so that metadata can be read before anything is restored.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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

    def restore_latest(self, abstract_state: TrainState,
                       data_iterator: grain.DatasetIterator) -> tuple[int, TrainState] | None:
        """(step, state) of the newest checkpoint that restores (see the module docstring), or None if there is none.

        `abstract_state` is a TrainState of ShapeDtypeStructs (with shardings); `data_iterator` is moved to the
        restored position. Raises ResumeError when checkpoints exist but none restores, or when their shapes are
        another model's.
        """
        expected = _shapes(abstract_state.to_checkpoint())
        skipped: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            reason, state = self._damage(step, expected), None
            if reason is None:
                state, reason = self._restore_items(step, abstract_state, data_iterator)
            if _all_processes(reason is None):
                self._set_aside([damaged for damaged, _ in skipped])
                return step, state
            reason = reason or "it does not restore on another process"
            if jax.process_index() == 0:
                print(f"checkpoint: step {step} is damaged and skipped ({reason})", flush=True)
            skipped.append((step, reason))
        if skipped:
            listed = "; ".join(f"step {step}: {reason}" for step, reason in skipped)
            raise ResumeError(f"checkpoint: no checkpoint in {self.directory} restores ({listed}); they are left "
                              f"in place; use another --workdir to start afresh")
        return None

    def _damage(self, step: int, expected: dict) -> str | None:
        """Why `step` cannot be restored (commit markers, metadata), or None; raises ResumeError for other shapes."""
        path = os.path.join(self.directory, str(step))
        if not ocp.path.step.is_path_finalized(path):
            return "Orbax never committed it"
        if not os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
            return "its _CHECKPOINT_METADATA is missing (an emptied or partly deleted folder)"
        missing = [item for item in _ITEMS if not os.path.isdir(os.path.join(path, item))]
        if missing:
            return f"its {missing[0]!r} item is missing"
        try:
            saved = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            return f"its metadata cannot be read: {_one_line(e)}"
        if saved is None:
            return "its state metadata is missing"
        mismatch = _first_shape_mismatch(_shapes(saved), expected)
        if mismatch is not None:
            raise ResumeError(f"checkpoint: step {step} in {self.directory} is another architecture: {mismatch}")
        return None

    def _restore_items(self, step: int, abstract_state: TrainState,
                       data_iterator: grain.DatasetIterator) -> tuple[TrainState | None, str | None]:
        """(state, None), or (None, why) naming the item that failed; restores the items one at a time."""
        state = None
        for item, args in (("state", ocp.args.StandardRestore(abstract_state.to_checkpoint())),
                           ("data", grain.checkpoint.CheckpointRestore(data_iterator))):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**{item: args}))
            except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types for unreadable data
                return None, f"restoring {item!r} failed: {_one_line(e)}"
            if item == "state":
                state = TrainState.from_checkpoint(restored["state"])
        return state, None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves skipped steps newer than the restored one out of Orbax's way (renamed, never deleted)."""
        if not steps:
            return
        target_root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        if jax.process_index() == 0:
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                target, copy = os.path.join(target_root, str(step)), 1
                while os.path.exists(target):
                    target, copy = os.path.join(target_root, f"{step}.{copy}"), copy + 1
                os.rename(os.path.join(self.directory, str(step)), target)
                print(f"checkpoint: moved damaged step {step} to {target} (not deleted); this run writes step "
                      f"{step} again", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ring_jax checkpoint set-aside")
        self._manager.reload()

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
