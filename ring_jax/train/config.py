"""The training config: the model section plus train, optim, data, checkpoint, mesh and logging, and their
validation.

`base_config()` is what config files start from. Every training field is documented inline; `validate_training`
raises `ConfigError` naming the offending field before anything compiles.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from pallas_kernels.linear_cross_entropy import LINEAR_CROSS_ENTROPY
from ring_jax.config import model_defaults
from ring_jax.errors import ConfigError
from ring_jax.sharding import MESH_AXES

NAN_POLICIES = ("stop", "skip")
SCHEDULES = ("cosine", "wsd")
DATA_FORMATS = ("auto", "txt", "jsonl", "arrayrecord")


def training_defaults() -> dict[str, ml_collections.ConfigDict]:
    """Default sections of the training config, keyed by section name."""
    train = ml_collections.ConfigDict()
    train.steps = 1000  # optimizer steps (the length of the learning-rate schedule)
    train.stop_at_step = 0  # end this invocation after this step, with a checkpoint (0: run to train.steps)
    train.batch_size = 8  # global sequences per optimizer step (split over grad_accum_steps micro-batches)
    train.seq_len = 256  # packed sequence length in tokens
    train.grad_accum_steps = 1  # micro-batches per optimizer step; batch_size must be divisible by it
    train.log_every = 10  # steps between metrics.jsonl / TensorBoard records
    train.seed = 0  # parameter init seed
    train.loss_implementation = "chunked"  # lm_head + cross-entropy: a LINEAR_CROSS_ENTROPY name or None
    train.loss_chunk_size = 4096  # 'chunked': tokens per chunk (live logits [chunk, vocab] fp32)
    train.autotune_kernels = True  # GPU: search tokamax grouped-matmul configs for the step's shapes before compiling
    train.nan_policy = "stop"  # 'stop': raise naming the step; 'skip': drop the update and continue
    train.max_skipped_steps = 10  # with nan_policy='skip', stop after this many consecutive skipped steps
    train.eval_every = 0  # steps between evaluations on the held-out documents (ring_jax.data.heldout); 0: none
    train.eval_batches = 4  # held-out batches (batch_size x seq_len) in each eval loss
    train.eval_task_examples = 60  # synthetic held-out set: task examples whose greedy answers are scored; 0: none

    optim = ml_collections.ConfigDict()
    optim.learning_rate = 3e-4  # peak learning rate (0: the weights never change, e.g. to evaluate or export)
    optim.b1 = 0.9
    optim.b2 = 0.95
    optim.eps = 1e-8
    optim.weight_decay = 0.1  # decoupled AdamW decay; never on norm scales (expert bias is no Param)
    optim.schedule = "cosine"  # 'cosine' (warmup + cosine) or 'wsd' (warmup-stable-decay)
    optim.warmup_steps = 100  # a run of at most this many steps warms up for steps // 10 instead
    optim.decay_fraction = 0.2  # 'wsd': fraction of steps spent in the final linear decay
    optim.min_lr_ratio = 0.1  # final lr = min_lr_ratio * learning_rate
    optim.clip_norm = 1.0  # global-norm gradient clipping; 0 disables
    optim.bias_update_rate = 1e-3  # aux-loss-free expert-bias update rate u; 0 disables
    optim.bias_zero_mean = True  # Ant's zero-mean variant of the sign update
    optim.router_z_loss_coef = 3.5e-6  # router z-loss coefficient

    data = ml_collections.ConfigDict()
    data.source = "default"  # 'default' (embedded synthetic tasks) or comma-separated local paths / globs
    data.format = "auto"  # one of DATA_FORMATS; 'auto' picks by file suffix
    data.text_field = "text"  # jsonl / ArrayRecord(JSON) record field holding the document text
    data.tokenizer = "bytes"  # 'bytes' (byte-level, 256 + specials) or a path to a HF tokenizer.json
    data.shuffle_seed = 0
    data.packing = True  # pack several documents per row with segment ids; False pads one document per row
    data.num_default_documents = 20000  # size of the embedded synthetic corpus
    data.worker_count = 0  # grain worker processes (0 = in-process, deterministic and checkpointable)
    data.num_shards = 0  # document shards, each packed into its own rows; 0 = one per process (fix it to keep the
    #                      global batches of a run independent of its process count)
    data.eval_source = ""  # held-out documents: paths / globs, or 'default' (synthetic); '' = from data.source
    data.eval_fraction = 0.0  # fraction of data.source's documents held out of training (when eval_source is '')

    checkpoint = ml_collections.ConfigDict()
    checkpoint.every_n_steps = 500  # 0 disables periodic saves (a final save still happens)
    checkpoint.keep = 3  # number of most recent checkpoints kept
    checkpoint.async_save = True
    checkpoint.save_on_finish = True
    checkpoint.init_from = ""  # start a new run from these weights (ring_jax.train.init_from): an HF folder or hub id,
    #                            a `convert from-hf` output, or another run's workdir; fresh optimizer
    checkpoint.init_from_overrides = ""  # comma-separated config.model fields kept from this config rather than taken
    #                                      from init_from's (train.py adds the --config.model.* flags it was given)
    checkpoint.hf_export_every = 0  # steps between HF exports (config.json + safetensors) to WORKDIR/hf/step_N; 0: none

    mesh = ml_collections.ConfigDict()
    mesh.data = 1  # -1 means "all remaining devices"
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.tensor = 1

    logging = ml_collections.ConfigDict()
    logging.tensorboard = True
    logging.metrics_file = "metrics.jsonl"
    logging.progress_bar = True

    return {
        "train": train,
        "optim": optim,
        "data": data,
        "checkpoint": checkpoint,
        "mesh": mesh,
        "logging": logging,
    }


def base_config() -> ml_collections.ConfigDict:
    """The full config: the `model` section (Ring-mini-linear-2.0 defaults) plus the training sections."""
    config = ml_collections.ConfigDict()
    config.model = model_defaults()
    for name, section in training_defaults().items():
        config[name] = section
    return config


def _require(condition: bool, field: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message} (got {value!r})")


def _check_positive_int(section: ml_collections.ConfigDict, name: str, prefix: str, allow_zero=False) -> None:
    value = section[name]
    low = 0 if allow_zero else 1
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
             f"{prefix}.{name}", f"must be an integer >= {low}", value)


def _check_finite(section: ml_collections.ConfigDict, prefix: str) -> None:
    """NaN/Inf in any float field (inf passes `> 0` checks and would only fail steps later, in the optimizer)."""
    for name, value in section.items():
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite(value, f"{prefix}.{name}")
        elif isinstance(value, float):
            _require(math.isfinite(value), f"{prefix}.{name}", "must be a finite number", value)


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Checks the training sections of `config`; raises ConfigError naming the first bad field."""
    for section in training_defaults():
        _require(section in config, section, "missing config section", None)
    for section in training_defaults():
        _check_finite(config[section], section)
    train, optim, data, ckpt, mesh = config.train, config.optim, config.data, config.checkpoint, config.mesh

    for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "max_skipped_steps",
                 "eval_batches"):  # fmt: skip
        _check_positive_int(train, name, "train")
    for name in ("eval_every", "eval_task_examples"):
        _check_positive_int(train, name, "train", allow_zero=True)
    _check_positive_int(train, "stop_at_step", "train", allow_zero=True)
    _require(train.batch_size % train.grad_accum_steps == 0, "train.batch_size",
             f"must be divisible by train.grad_accum_steps={train.grad_accum_steps}", train.batch_size)
    _require(train.loss_implementation in LINEAR_CROSS_ENTROPY.choices(), "train.loss_implementation",
             f"must be one of {LINEAR_CROSS_ENTROPY.choices()}", train.loss_implementation)
    _check_positive_int(train, "loss_chunk_size", "train")
    _require(train.nan_policy in NAN_POLICIES, "train.nan_policy", f"must be one of {NAN_POLICIES}",
             train.nan_policy)

    _require(optim.learning_rate >= 0, "optim.learning_rate", "must be >= 0", optim.learning_rate)
    for name in ("b1", "b2"):
        _require(0 <= optim[name] < 1, f"optim.{name}", "must be in [0, 1)", optim[name])
    _require(optim.eps > 0, "optim.eps", "must be > 0", optim.eps)
    _require(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0", optim.weight_decay)
    _require(optim.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}", optim.schedule)
    _check_positive_int(optim, "warmup_steps", "optim", allow_zero=True)  # clamped for runs shorter than it
    _require(0 < optim.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]", optim.decay_fraction)
    _require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", optim.min_lr_ratio)
    _require(optim.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)", optim.clip_norm)
    _require(optim.bias_update_rate >= 0, "optim.bias_update_rate", "must be >= 0", optim.bias_update_rate)
    _require(optim.router_z_loss_coef >= 0, "optim.router_z_loss_coef", "must be >= 0",
             optim.router_z_loss_coef)

    _require(isinstance(data.source, str) and data.source != "", "data.source",
             "must be 'default' or comma-separated paths", data.source)
    _require(data.format in DATA_FORMATS, "data.format", f"must be one of {DATA_FORMATS}", data.format)
    _require(isinstance(data.tokenizer, str) and data.tokenizer != "", "data.tokenizer",
             "must be 'bytes' or a path to tokenizer.json", data.tokenizer)
    _check_positive_int(data, "num_default_documents", "data")
    _check_positive_int(data, "worker_count", "data", allow_zero=True)
    _check_positive_int(data, "num_shards", "data", allow_zero=True)
    _require(isinstance(data.eval_source, str), "data.eval_source", "must be paths / globs, 'default' or ''",
             data.eval_source)  # fmt: skip
    _require(0 <= data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)", data.eval_fraction)

    _check_positive_int(ckpt, "every_n_steps", "checkpoint", allow_zero=True)
    _check_positive_int(ckpt, "keep", "checkpoint")
    _check_positive_int(ckpt, "hf_export_every", "checkpoint", allow_zero=True)
    _require(isinstance(ckpt.init_from, str), "checkpoint.init_from", "must be a path, a hub id or ''", ckpt.init_from)

    for axis in MESH_AXES:
        size = mesh[axis]
        _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{axis}",
                 "must be a positive integer or -1 (all remaining devices)", size)
    _require(sum(mesh[axis] == -1 for axis in MESH_AXES) <= 1, "mesh",
             "at most one axis may be -1", {axis: mesh[axis] for axis in MESH_AXES})
