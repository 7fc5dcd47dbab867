"""Evaluation during training on the held-out documents (`ring_jax.data.heldout`), every `train.eval_every` steps:

- `eval_loss`: the token cross-entropy (the training loss's `ce_loss`, same loss mask) over `train.eval_batches`
  fixed held-out batches;
- on the synthetic tasks' held-out set, `eval_exact_match` (and per task, `eval_exact_match/<task>`): the fraction of
  `train.eval_task_examples` examples whose greedy answer (`ring_jax.generate`, up to the first newline)
  `synthetic.verify` accepts.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ring_jax.data import heldout
from ring_jax.data.errors import DataError
from ring_jax.data.pipeline import make_dataset
from ring_jax.data.synthetic import Example, verify
from ring_jax.data.tokenizers import make_tokenizer
from ring_jax.generate import GenerationConfig, generate
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
        scores_answers = heldout.uses_synthetic_tasks(config.data) and train.eval_task_examples > 0
        if scores_answers and jax.process_count() > 1:
            scores_answers = False
            if jax.process_index() == 0:
                print("train: no eval_exact_match: generating answers needs a single-process run", flush=True)
        if scores_answers:
            self._examples = heldout.task_examples(config.data, train.eval_task_examples)
            self._tokenizer = make_tokenizer(config.data.tokenizer)
            bos = [] if self._tokenizer.bos_id is None else [self._tokenizer.bos_id]
            self._prompts = [bos + self._tokenizer.encode(example.prompt).tolist() for example in self._examples]
            newline = tuple(self._tokenizer.encode("\n").tolist())
            answers = [len(self._tokenizer.encode(example.answer + "\n")) for example in self._examples]
            # A greedy answer is read up to its first newline; past the longest right answer (and a little slack
            # for the whitespace verify strips) it is wrong whatever follows.
            self._generation = GenerationConfig(max_new_tokens=max(answers) + 2, stop_sequences=(newline,))
        lm_head_loss = make_lm_head_loss(train)

        def loss_sums(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
            model = _model(factory, state)
            hidden = model.forward(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                                   compute_logits=False).hidden_states  # fmt: skip
            return lm_head_loss(model, hidden, batch["targets"], batch["loss_mask"]), jnp.sum(batch["loss_mask"])

        self._loss_sums = jax.jit(loss_sums, in_shardings=(factory.shardings, self._sharding))

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
            completions = generate(_model(self._factory, state), self._prompts, self._generation)
            right = np.asarray([verify(example.prompt, self._tokenizer.decode(completion.tokens))
                                for example, completion in zip(self._examples, completions, strict=True)])  # fmt: skip
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
