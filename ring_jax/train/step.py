"""The jitted train step: masked token CE + router z-loss + optional MTP loss, gradient accumulation, AdamW,
NaN/Inf guard, then the aux-loss-free expert-bias update (docs/architecture.md#load-balancing)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from pallas_kernels.linear_cross_entropy import linear_cross_entropy
from ring_jax.layers.moe import ExpertLoad
from ring_jax.sharding import per_shard
from ring_jax.train.optim import make_schedule
from ring_jax.train.state import StateFactory, TrainState

Batch = dict[str, jax.Array]
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                "loss_mask": jnp.float32}  # fmt: skip  (ring_jax.data.pipeline's batch fields, each [batch, seq])


def abstract_batch(batch_size: int, seq_len: int, sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global training batch, for lowering the step without data."""
    return {name: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding)
            for name, dtype in BATCH_DTYPES.items()}  # fmt: skip


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> Batch:
    """This process's rows of a batch (numpy) as global arrays with `sharding`."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}


def mtp_targets(batch: Batch, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask for MTP depth d: position t predicts targets[t + d], within the same document only."""
    targets, mask, segments = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    shifted = lambda x: jnp.pad(x[:, depth:], ((0, 0), (0, depth)))
    same_document = (shifted(segments) == segments) & (segments > 0)
    return shifted(targets), shifted(mask) * same_document


def update_expert_bias(bias: jax.Array, load: jax.Array, rate: float, zero_mean: bool) -> jax.Array:
    """b_i += u·sign(n̄ − n_i) (minus the mean of the sign terms for the zero-mean variant); [..., E] leaves."""
    step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    if zero_mean:
        step = step - jnp.mean(step, axis=-1, keepdims=True)
    return bias + rate * step


def load_imbalance(expert_load: jax.Array) -> jax.Array:
    """[num_moe_layers, E] token counts -> [num_moe_layers] max/mean load (1 = perfectly balanced)."""
    return jnp.max(expert_load, axis=-1) / jnp.maximum(jnp.mean(expert_load, axis=-1), 1e-9)


def make_lm_head_loss(train: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
    """`loss(model, hidden [b, s, h], targets [b, s], weights [b, s]) -> sum of weights * token cross-entropy` (fp32
    scalar): the lm_head fused with the loss (`train.loss_implementation`, `train.loss_chunk_size`), each device
    taking the loss of its own tokens under a mesh (one partial sum per shard, added outside)."""
    tokens = ("activation_tokens",)
    per_shard_loss = per_shard(
        lambda hidden, kernel, targets, weights: linear_cross_entropy(
            hidden, kernel, targets, weights, implementation=train.loss_implementation,
            chunk_size=train.loss_chunk_size,
        )[None],
        in_names=((*tokens, None), None, tokens, tokens),
        out_names=tokens,
    )  # fmt: skip

    def loss(model: nnx.Module, hidden: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
        kernel = model.lm_head.kernel[...].astype(hidden.dtype)  # cast before a mesh gathers it
        return jnp.sum(per_shard_loss(hidden.reshape(-1, hidden.shape[-1]), kernel, targets.reshape(-1),
                                      weights.reshape(-1)))  # fmt: skip

    return loss


def make_train_step(factory: StateFactory, config: ml_collections.ConfigDict) -> Callable:
    """Returns jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

    batch leaves are [global_batch, seq] (see ring_jax.data.pipeline). A non-finite loss or gradient applies no
    update to the params, optimizer state or expert biases and sets metrics['finite'] = False (the caller stops or
    continues, per train.nan_policy); `step` still advances (the batch was consumed) and `expert_load` records that
    batch's routing.
    """
    graphdef, tx, model_config = factory.graphdef, factory.tx, factory.model_config
    optim, train = config.optim, config.train
    schedule = make_schedule(optim, train.steps)
    bias_rate = optim.bias_update_rate if model_config.moe_router_enable_expert_bias else 0.0
    accum = train.grad_accum_steps
    z_coef = optim.router_z_loss_coef
    mtp_scale = model_config.mtp_loss_scaling_factor
    num_mtp = model_config.num_nextn_predict_layers

    def micro_loss(params, expert_bias, expert_load, model_vars, micro: Batch, token_counts: tuple):
        total_tokens, mtp_tokens = token_counts  # global counts: micro-batch losses sum to the batch mean
        model = nnx.merge(graphdef, params, expert_bias, expert_load, model_vars, copy=True)
        out = model.forward(
            micro["inputs"],
            positions=micro["positions"],
            segment_ids=micro["segment_ids"],
            token_mask=micro["segment_ids"] > 0,  # segment 0 is padding: no say in the expert-bias update
            compute_logits=False,  # the lm_head runs fused with the loss
        )

        lm_head_loss = functools.partial(weighted_lm_head_loss, model)
        ce = lm_head_loss(out.hidden_states, micro["targets"], micro["loss_mask"] / total_tokens)
        mtp = jnp.zeros((), jnp.float32)
        for depth, mtp_hidden in enumerate(out.mtp_hidden_states, start=1):
            targets, mask = mtp_targets(micro, depth)
            mtp += lm_head_loss(mtp_hidden, targets, mask / mtp_tokens[depth - 1]) / num_mtp
        z_loss = out.router_z_loss / accum
        loss = ce + z_coef * z_loss + mtp_scale * mtp
        aux = {
            "ce_loss": ce,
            "router_z_loss": z_loss,
            "mtp_loss": mtp,
            "expert_load": out.expert_load,
            "expert_load_state": nnx.state(model, ExpertLoad),
        }
        return loss, aux

    weighted_lm_head_loss = make_lm_head_loss(train)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        params, expert_bias, model_vars = state.params, state.expert_bias, state.model_vars
        frozen = (expert_bias, state.expert_load, model_vars)
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        mtp_tokens = [jnp.maximum(jnp.sum(mtp_targets(batch, depth)[1]), 1.0) for depth in range(1, num_mtp + 1)]
        token_counts = (total_tokens, mtp_tokens)
        # [B, S] -> [accum, B / accum, S], taking every accum-th row so each micro-batch stays evenly sharded.
        micro_batches = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch
        )

        def accumulate(carry, micro):
            (loss, aux), grads = grad_fn(params, *frozen, micro, token_counts)
            summed = jax.tree.map(jnp.add, carry, (loss, aux, grads))
            return summed, None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        carry = grad_fn(params, *frozen, first, token_counts)
        carry = (carry[0][0], carry[0][1], carry[1])
        if accum > 1:
            rest = jax.tree.map(lambda x: x[1:], micro_batches)
            carry, _ = jax.lax.scan(accumulate, carry, rest)
        loss, aux, grads = carry

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        load_state = aux["expert_load_state"]
        # Pair each router's bias with its load by the router's path (the trees differ only in the last key).
        loads = {path[:-1]: load for path, load in nnx.to_flat_state(load_state)}

        def apply_update(params, opt_state, expert_bias):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_bias = nnx.from_flat_state([
                (path, bias.replace(update_expert_bias(bias.get_value(), loads[path[:-1]].get_value(), bias_rate,
                                                       optim.bias_zero_mean)))
                for path, bias in nnx.to_flat_state(expert_bias)
            ])
            return optax.apply_updates(params, updates), new_opt_state, new_bias

        # A non-finite step keeps the old state. A cond, not a select per leaf: only the taken branch runs, so a
        # normal step makes one pass over params and optimizer state (a select would read both versions again).
        new_params, new_opt_state, new_bias = jax.lax.cond(
            finite, apply_update, lambda *old: old, params, state.opt_state, expert_bias
        )
        new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                                  expert_bias=new_bias, expert_load=load_state)  # fmt: skip
        metrics = {
            "loss": loss,
            "ce_loss": aux["ce_loss"],
            "router_z_loss": aux["router_z_loss"],
            "mtp_loss": aux["mtp_loss"],
            "grad_norm": grad_norm,
            # The rate this update used: the optimizer's own step count (skipped steps do not advance it).
            "learning_rate": schedule(optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")[0][1]),
            "finite": finite,
            "loss_tokens": total_tokens,
            "moe_load_imbalance": load_imbalance(aux["expert_load"]),
        }
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(factory.shardings, factory.batch_sharding()),
        out_shardings=(factory.shardings, None),
        donate_argnums=(0,),
    )
