"""The training loop: validate -> data -> mesh/state -> restore -> jitted steps -> metrics/checkpoints.

Everything that can be wrong with the config or the data raises before the first compilation. SIGTERM makes the
loop save a checkpoint at the next step boundary and return cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ring_jax.data.pipeline import make_dataset
from ring_jax.sharding import make_mesh
from ring_jax.train import init_from
from ring_jax.train.checkpoint import Checkpointer
from ring_jax.train.evaluate import Evaluator, make_evaluator
from ring_jax.train.export import make_exporter
from ring_jax.train.metrics import MetricsWriter, ProgressBar
from ring_jax.train.optim import make_optimizer
from ring_jax.train.state import StateFactory, validate
from ring_jax.train.step import global_batch, make_train_step
from ring_jax.train.tuning import KERNEL_TUNING_FILE, tune_kernels

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or gradient became NaN/Inf (nan_policy='stop', or too many consecutive skips)."""


@dataclasses.dataclass
class TrainResult:
    """What a `train` call did: the step it started from and reached, per-step losses, and why it ended."""

    start_step: int
    final_step: int
    losses: dict[int, float]
    preempted: bool = False
    skipped_steps: int = 0
    saved: bool = False  # a checkpoint of final_step exists


class _SigtermFlag:
    """Records SIGTERM instead of dying, so the loop can checkpoint first (restores the old handler on exit)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if _is_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def save_resolved_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _save(checkpointer: Checkpointer, step: int, state, data_iterator) -> bool:
    if jax.process_index() == 0:
        print(f"checkpoint: saving step {step}", flush=True)
    return checkpointer.save(step, state, data_iterator)


def _evaluate(evaluator: Evaluator, step: int, state, writer: MetricsWriter) -> None:
    metrics = evaluator.run(state)
    writer.write(step, metrics)
    if jax.process_index() == 0:
        print(f"eval: step {step} " + " ".join(f"{key} {value:.4f}" for key, value in metrics.items()), flush=True)


def _any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any: all hosts leave the loop at the same step boundary."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> TrainResult:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns what happened.

    `stop_at_step` (default: `train.stop_at_step`, 0 = none) ends this invocation early (with a checkpoint) without
    changing the schedule, which always spans `train.steps`; a later call continues from there.
    """
    config, init_source = init_from.resolve(config)  # config.model follows checkpoint.init_from's weights
    model_config = validate(config)
    if stop_at_step is None and config.train.stop_at_step:
        stop_at_step = config.train.stop_at_step
    train_cfg, ckpt_cfg, log_cfg = config.train, config.checkpoint, config.logging
    dataset = make_dataset(config.data, seq_len=train_cfg.seq_len, global_batch_size=train_cfg.batch_size,
                           vocab_size=model_config.vocab_size)
    next(iter(dataset))  # a first batch through every check (token ids < vocab) before anything compiles
    data_iterator = iter(dataset)
    save_resolved_config(config, workdir)

    mesh = make_mesh(config.mesh, use_all=True)
    tx, _ = make_optimizer(config.optim, train_cfg.steps)
    factory = StateFactory(model_config, tx, mesh, seed=train_cfg.seed)
    evaluator = make_evaluator(factory, config)  # held-out data checked before anything compiles
    exporter = make_exporter(workdir, config, model_config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_n_steps=ckpt_cfg.every_n_steps,
                                keep=ckpt_cfg.keep, async_save=ckpt_cfg.async_save)
    latest = checkpointer.latest_step()
    if latest is None:
        state = factory.init() if init_source is None else init_from.initial_state(factory, init_source)
    else:
        state = checkpointer.restore(latest, factory.abstract_with_shardings(), data_iterator)
        log.info("resumed from step %d", latest)
    start_step = int(jax.device_get(state.step))
    print(f"train: {'resuming at' if latest is not None else 'starting at'} step {start_step}", flush=True)

    train_step = make_train_step(factory, config)
    batch_sharding = factory.batch_sharding()
    if train_cfg.autotune_kernels:
        tune_kernels(train_step, factory, config, os.path.join(workdir, KERNEL_TUNING_FILE))
    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, filename=log_cfg.metrics_file, tensorboard=log_cfg.tensorboard, enabled=is_main,
                           start_step=start_step)
    bar = ProgressBar(start=start_step, total=train_cfg.steps, enabled=log_cfg.progress_bar and is_main)
    result = TrainResult(start_step=start_step, final_step=start_step, losses={})
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    consecutive_skips = 0
    pending: tuple[int, dict[str, Any]] | None = None  # metrics of the previous step, read one step late
    window_start, window_steps = time.perf_counter(), 0

    def finish_step(step: int, metrics: dict[str, Any]) -> None:
        nonlocal consecutive_skips, window_start, window_steps
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        window_steps += 1
        if not bool(metrics["finite"]):
            message = (f"step {step}: non-finite loss ({loss}) or gradient norm ({float(metrics['grad_norm'])}); "
                       f"the update was not applied")
            if train_cfg.nan_policy == "stop":
                raise NonFiniteError(message + " — stopping (train.nan_policy='stop')")
            consecutive_skips += 1
            result.skipped_steps += 1
            log.warning("%s — skipping (train.nan_policy='skip')", message)
            if consecutive_skips > train_cfg.max_skipped_steps:
                raise NonFiniteError(f"step {step}: {consecutive_skips} consecutive non-finite steps "
                                     f"(train.max_skipped_steps={train_cfg.max_skipped_steps})")
            return
        consecutive_skips = 0
        result.losses[step] = loss
        is_log_step = step % train_cfg.log_every == 0 or step == train_cfg.steps
        if step == start_step + 1 and not is_log_step:  # tokens/s windows start after the compiling step
            window_start, window_steps = time.perf_counter(), 0
        if is_log_step:
            elapsed = time.perf_counter() - window_start
            tokens_per_second = tokens_per_step * window_steps / max(elapsed, 1e-9)
            imbalance = np.asarray(metrics["moe_load_imbalance"])
            record = {
                "loss": loss,
                "ce_loss": float(metrics["ce_loss"]),
                "router_z_loss": float(metrics["router_z_loss"]),
                "mtp_loss": float(metrics["mtp_loss"]),
                "learning_rate": float(metrics["learning_rate"]),
                "tokens_per_second": tokens_per_second,
                "grad_norm": float(metrics["grad_norm"]),
                "loss_tokens": int(metrics["loss_tokens"]),
                "moe_load_imbalance": imbalance.tolist(),
                "moe_load_imbalance_max": float(imbalance.max()) if imbalance.size else 1.0,
            }
            writer.write(step, record)
            bar.update(0, loss=loss, tokens_per_second=tokens_per_second)
            window_start, window_steps = time.perf_counter(), 0

    try:
        with _SigtermFlag() as sigterm, jax.set_mesh(mesh):
            step = start_step
            end_step = train_cfg.steps if stop_at_step is None else min(stop_at_step, train_cfg.steps)
            stop = False
            while step < end_step and not stop:
                batch = global_batch(next(data_iterator), batch_sharding)
                state, metrics = train_step(state, batch)
                step += 1
                paused = time.perf_counter()
                if evaluator is not None and evaluator.due(step):
                    _evaluate(evaluator, step, state, writer)
                if exporter is not None and exporter.due(step):
                    exporter.export(step, state)
                window_start += time.perf_counter() - paused  # tokens/s counts the training steps only
                if pending is not None:
                    finish_step(*pending)
                pending = (step, metrics)
                bar.update(1)
                if checkpointer.should_save(step):
                    finish_step(*pending)
                    pending = None
                    _save(checkpointer, step, state, data_iterator)
                stop = _any_process(sigterm.raised)
            if pending is not None:
                finish_step(*pending)
            result.final_step = step
            result.preempted = stop
            already_saved = checkpointer.should_save(step) and step > start_step
            wants_save = stop or stop_at_step is not None or ckpt_cfg.save_on_finish
            result.saved = already_saved
            if not already_saved and wants_save and step > start_step:
                result.saved = _save(checkpointer, step, state, data_iterator)
    finally:
        checkpointer.close()
        writer.close()
        bar.close()
    if result.preempted:
        outcome = "saved" if result.saved else "could not save (see the log)"
        print(f"train: SIGTERM — {outcome} step {result.final_step} and exited", flush=True)
    return result
