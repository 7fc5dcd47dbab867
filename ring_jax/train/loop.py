"""The training loop: validate -> lock the workdir -> compare the saved config -> data -> mesh/state -> restore
-> jitted steps -> metrics/checkpoints.

Everything that can be wrong with the config or the data raises before the first compilation and before anything
in the workdir is written. SIGTERM makes the loop save a checkpoint at the next step boundary and return cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ring_jax.config import ModelConfig
from ring_jax.data.pipeline import make_dataset
from ring_jax.sharding import make_mesh
from ring_jax.train import init_from
from ring_jax.train.checkpoint import CHECKPOINT_DIR, Checkpointer, has_checkpoints
from ring_jax.train.evaluate import Evaluator, make_evaluator
from ring_jax.train.export import make_exporter
from ring_jax.train.metrics import MetricsWriter, ProgressBar
from ring_jax.train.optim import effective_warmup_steps, make_optimizer
from ring_jax.train.run_config import check_resume_config, save_config
from ring_jax.train.state import StateFactory, validate
from ring_jax.train.step import global_batch, make_train_step
from ring_jax.train.tuning import KERNEL_TUNING_FILE, tune_kernels
from ring_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError

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


@contextlib.contextmanager
def _exclusive_workdir(workdir: str) -> Iterator[None]:
    """Holds the workdir lock (process 0 takes it; every process fails alike if it cannot)."""
    lock = WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            error = e
    if _any_process(error is not None):
        raise error or WorkdirLockedError(f"workdir {workdir} is in use by another training run (see process 0)")
    try:
        yield
    finally:
        lock.release()


def _check_resume_config(config: ml_collections.ConfigDict, workdir: str, checkpoint_dir: str) -> None:
    """Architecture changes against a run that has checkpoints fail here; runtime changes are listed."""
    if not has_checkpoints(checkpoint_dir):
        return
    changes = check_resume_config(config, workdir)
    if changes and jax.process_index() == 0:
        print(f"train: resuming with changed runtime settings: {'; '.join(changes)}", flush=True)


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
    """Trains `config` in `workdir` (resuming from its latest checkpoint that restores); returns what happened.

    `stop_at_step` (default: `train.stop_at_step`, 0 = none) ends this invocation early (with a checkpoint) without
    changing the schedule, which always spans `train.steps`; a later call continues from there. The workdir is
    locked for the whole call: a second run on it raises WorkdirLockedError naming the holder.
    """
    config, init_source = init_from.resolve(config)  # config.model follows checkpoint.init_from's weights
    model_config = validate(config)
    if stop_at_step is None and config.train.stop_at_step:
        stop_at_step = config.train.stop_at_step
    with _exclusive_workdir(workdir):
        return _train_locked(config, model_config, init_source, workdir, stop_at_step)


def _train_locked(config: ml_collections.ConfigDict, model_config: ModelConfig,
                  init_source: init_from.InitSource | None, workdir: str, stop_at_step: int | None) -> TrainResult:
    train_cfg, ckpt_cfg, log_cfg = config.train, config.checkpoint, config.logging
    checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
    _check_resume_config(config, workdir, checkpoint_dir)  # before anything in the workdir is written
    warmup_steps = effective_warmup_steps(config.optim, train_cfg.steps)
    if warmup_steps != config.optim.warmup_steps and jax.process_index() == 0:
        print(f"train: optim.warmup_steps={config.optim.warmup_steps} is not shorter than train.steps="
              f"{train_cfg.steps}; warming up for {warmup_steps} steps instead", flush=True)
    dataset = make_dataset(config.data, seq_len=train_cfg.seq_len, global_batch_size=train_cfg.batch_size,
                           vocab_size=model_config.vocab_size)
    next(iter(dataset))  # a first batch through every check (token ids < vocab) before anything compiles
    data_iterator = iter(dataset)

    mesh = make_mesh(config.mesh, use_all=True)
    tx, _ = make_optimizer(config.optim, train_cfg.steps)
    factory = StateFactory(model_config, tx, mesh, seed=train_cfg.seed)
    evaluator = make_evaluator(factory, config)  # held-out data checked before anything compiles
    exporter = make_exporter(workdir, config, model_config)
    checkpointer = Checkpointer(checkpoint_dir, every_n_steps=ckpt_cfg.every_n_steps, keep=ckpt_cfg.keep,
                                async_save=ckpt_cfg.async_save)
    try:
        resumed = checkpointer.restore_latest(factory.abstract_with_shardings(), data_iterator)
    except BaseException:
        checkpointer.close()
        raise
    if resumed is not None:
        latest, state = resumed
    else:
        latest = None
        state = factory.init() if init_source is None else init_from.initial_state(factory, init_source)
    if jax.process_index() == 0:
        save_config(config, workdir)  # only once the checkpoint is known to fit this config
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
