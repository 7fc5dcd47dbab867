"""Orbax CheckpointManager wrapper: train state + grain iterator state, async saves, keep last K, no NaNs.

Orbax writes each step into a temporary directory and renames it on commit, so a process killed mid-save
leaves the previous checkpoint as the latest complete one; leftover temporaries are removed on the next start.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ring_jax.train.state import TrainState

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
