"""AdamW with warmup + cosine or warmup-stable-decay, global-norm clipping, no decay on norm scales."""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx


def effective_warmup_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
    """`optim.warmup_steps`, or a tenth of the run when the run is not longer than that warmup.

    A quick run (`--config.train.steps=10` with the default warmup of 20) then just works, with the same short
    warmup share a long run has; the loop prints a one-line notice when the clamp applies.
    """
    if optim.warmup_steps < total_steps:
        return optim.warmup_steps
    return total_steps // 10


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup from 0, then cosine or WSD to min_lr_ratio * peak."""
    peak = optim.learning_rate
    floor = peak * optim.min_lr_ratio
    warmup = effective_warmup_steps(optim, total_steps)
    after_warmup = max(total_steps - warmup, 1)
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if optim.schedule == "cosine":
        main_fn = optax.cosine_decay_schedule(peak, after_warmup, alpha=optim.min_lr_ratio)
    else:  # warmup-stable-decay: constant, then linear decay over the last decay_fraction of all steps
        decay = min(max(int(round(total_steps * optim.decay_fraction)), 1), after_warmup)
        main_fn = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
            [after_warmup - decay],
        )
    if warmup == 0:
        return main_fn
    return optax.join_schedules([warmup_fn, main_fn], [warmup])


def decay_mask(params) -> object:
    """True for leaves that get weight decay: everything except norm scales (parameters named 'scale').

    `params` is an `nnx.State` of Params (or a plain dict); each Variable counts as one leaf, so the name tested
    is the parameter's own, not the Variable's internal `value` field.
    """

    def wants_decay(path, _leaf) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", last))
        return str(name) != "scale"

    return jax.tree_util.tree_map_with_path(wants_decay, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                                   optax.Schedule]:
    """The optax chain used by the train step, and its schedule (for logging)."""
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
