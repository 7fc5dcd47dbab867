"""Evaluation during training on the held-out documents (`ring_jax.data.heldout`), every `train.eval_every` steps:

- `eval_loss`: the token cross-entropy (the training loss's `ce_loss`, same loss mask) over `train.eval_batches`
  fixed held-out batches;
- on the synthetic tasks' held-out set, `eval_exact_match` (and per task, `eval_exact_match/<task>`): the fraction of
  `train.eval_task_examples` examples whose greedy answer is exactly right. Computed teacher-forced: every answer
  token and the newline that closes it must be the model's argmax given the prompt and the answer before it, which
  holds exactly when greedy decoding from the prompt writes the answer and the newline (`synthetic.verify`'s reading).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ring_jax.data import heldout, sft
from ring_jax.data.pipeline import make_dataset
from ring_jax.data.sources import DataError
from ring_jax.data.synthetic import Example
from ring_jax.data.tokenizers import make_tokenizer
from ring_jax.sharding import batch_shards
from ring_jax.train.state import StateFactory, TrainState
from ring_jax.train.step import Batch, global_batch, make_lm_head_loss


class Evaluator:
    """Built before anything compiles (held-out data errors surface first); `run(state)` returns the eval metrics."""

    def __init__(self, factory: StateFactory, config: ml_collections.ConfigDict):
        train = config.train
        self.every = train.eval_every
        self._factory = factory
        self._sharding = factory.batch_sharding()
        vocab_size = factory.model_config.vocab_size
        batches = make_dataset(config.data, seq_len=train.seq_len, global_batch_size=train.batch_size,
                               vocab_size=vocab_size, held_out=True)  # fmt: skip
        self._batches = list(itertools.islice(batches, train.eval_batches))
        if not self._batches:
            raise DataError(f"data: the held-out documents fill no batch of train.batch_size={train.batch_size} rows")
        self._examples: list[Example] = []
        if heldout.uses_synthetic_tasks(config.data) and train.eval_task_examples:
            self._examples = heldout.task_examples(config.data, train.eval_task_examples)
            self._answers = answer_batch(self._examples, make_tokenizer(config.data.tokenizer),
                                         batch_shards(factory.mesh))  # fmt: skip
        lm_head_loss = make_lm_head_loss(train)

        def loss_sums(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
            model = _model(factory, state)
            hidden = model.forward(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                                   compute_logits=False).hidden_states  # fmt: skip
            return lm_head_loss(model, hidden, batch["targets"], batch["loss_mask"]), jnp.sum(batch["loss_mask"])

        def answers_right(state: TrainState, batch: Batch) -> jax.Array:
            logits = _model(factory, state).forward(batch["inputs"], segment_ids=batch["segment_ids"]).logits
            right = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (batch["loss_mask"] == 0)
            return jnp.all(right, axis=-1)

        shardings = (factory.shardings, self._sharding)
        self._loss_sums = jax.jit(loss_sums, in_shardings=shardings)
        replicated = NamedSharding(factory.mesh, PartitionSpec())  # every process reads every row's result
        self._answers_right = jax.jit(answers_right, in_shardings=shardings, out_shardings=replicated)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def run(self, state: TrainState) -> dict[str, float]:
        """eval_loss, and eval_exact_match (overall and per task) on the synthetic tasks."""
        total, count = 0.0, 0.0
        with jax.set_mesh(self._factory.mesh):
            for batch in self._batches:
                loss, tokens = jax.device_get(self._loss_sums(state, global_batch(batch, self._sharding)))
                total, count = total + float(loss), count + float(tokens)
            metrics = {"eval_loss": total / max(count, 1.0)}
            if self._examples:
                right = self._answers_right(state, global_batch(self._answers, self._sharding))
                right = np.asarray(jax.device_get(right))[: len(self._examples)]
                metrics["eval_exact_match"] = float(np.mean(right))
                for task in sorted({example.task for example in self._examples}):
                    mine = [i for i, example in enumerate(self._examples) if example.task == task]
                    metrics[f"eval_exact_match/{task}"] = float(np.mean(right[mine]))
        return metrics


def make_evaluator(factory: StateFactory, config: ml_collections.ConfigDict) -> Evaluator | None:
    """The run's Evaluator; None without `train.eval_every` or without held-out documents (said once: a file source
    needs data.eval_source or data.eval_fraction)."""
    if not config.train.eval_every:
        return None
    if not heldout.has_held_out(config.data):
        if jax.process_index() == 0:
            print(f"train: no evaluation: train.eval_every={config.train.eval_every} but data.source has no held-out "
                  f"documents (set data.eval_source or data.eval_fraction)", flush=True)  # fmt: skip
        return None
    return Evaluator(factory, config)


def _model(factory: StateFactory, state: TrainState) -> Any:
    return nnx.merge(factory.graphdef, state.params, state.expert_bias, state.expert_load, state.model_vars, copy=True)


def answer_batch(examples: list[Example], tokenizer: Any, row_multiple: int) -> dict[str, np.ndarray]:
    """One example per row: inputs / targets of `[BOS] prompt answer "\\n"`, loss_mask 1 on the answer and newline
    targets, segment_ids 1 on real tokens; rows padded (fully masked) to a multiple of `row_multiple`. Returns this
    process's rows (contiguous blocks, in process order)."""
    rows = []
    for example in examples:
        # The documents' "\n" closes the answer; the EOS after it is not part of what greedy decoding must write.
        tokens, learned = sft.encode({"prompt": example.prompt, "completion": example.answer + "\n"}, tokenizer)
        if tokenizer.eos_id is not None:
            tokens, learned = tokens[:-1], learned[:-1]
        rows.append((tokens[:-1], tokens[1:], learned[1:]))
    length = max(len(inputs) for inputs, _, _ in rows)
    count = -(-len(rows) // row_multiple) * row_multiple
    batch = {
        key: np.zeros((count, length), dtype)
        for key, dtype in (
            ("inputs", np.int32),
            ("targets", np.int32),
            ("loss_mask", np.float32),
            ("segment_ids", np.int32),
        )
    }
    for row, (inputs, targets, mask) in enumerate(rows):
        n = len(inputs)
        batch["inputs"][row, :n], batch["targets"][row, :n], batch["loss_mask"][row, :n] = inputs, targets, mask
        batch["segment_ids"][row, :n] = 1
    local = slice(jax.process_index() * count // jax.process_count(), (jax.process_index() + 1) * count //
                  jax.process_count())  # fmt: skip
    return {key: value[local] for key, value in batch.items()}
