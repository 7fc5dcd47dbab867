"""Evaluation during training: eval loss on held-out batches, exact-match accuracy of greedy answers on the
synthetic tasks; held-out documents never reach training."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import tiny_train_config

from ring_jax.data import synthetic
from ring_jax.data.pipeline import make_dataset
from ring_jax.data.tokenizers import ByteTokenizer
from ring_jax.sharding import make_mesh
from ring_jax.train.evaluate import Evaluator
from ring_jax.train.optim import make_optimizer
from ring_jax.train.state import StateFactory, validate
from ring_jax.train.step import make_train_step


def factory_of(config):
    tx, _ = make_optimizer(config.optim, config.train.steps)
    return StateFactory(validate(config), tx, make_mesh(config.mesh, use_all=True), seed=config.train.seed)


def model_of(factory, state):
    return nnx.merge(factory.graphdef, state.params, state.expert_bias, state.expert_load, state.model_vars)


def test_eval_loss_is_the_masked_token_cross_entropy_of_the_held_out_batches():
    config = tiny_train_config(train__eval_every=1, train__eval_batches=2, train__eval_task_examples=0)
    factory = factory_of(config)
    state = factory.init()
    metrics = Evaluator(factory, config).run(state)
    assert set(metrics) == {"eval_loss"}

    forward = nnx.jit(lambda model, batch: model.forward(batch["inputs"], positions=batch["positions"],
                                                         segment_ids=batch["segment_ids"]).logits)  # fmt: skip
    held_out = make_dataset(config.data, seq_len=32, global_batch_size=4, vocab_size=272, held_out=True)
    total = count = 0.0
    for batch in itertools.islice(held_out, 2):
        logits = np.asarray(forward(model_of(factory, state), batch), np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
            logits.max(-1, keepdims=True)  # fmt: skip
        picked = np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
        total += float(-(picked * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
    np.testing.assert_allclose(metrics["eval_loss"], total / count, rtol=1e-5)


def greedy_answer(factory, state, prompt: str, max_new: int = 12) -> str:
    """Greedy decoding with the hybrid cache, one token per call (a decoding loop independent of the evaluator)."""
    graphdef, params = nnx.split(model_of(factory, state))

    @jax.jit
    def step(params, token, cache):
        out = nnx.merge(graphdef, params, copy=True).forward(token, cache=cache)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    tokenizer = ByteTokenizer()
    cache = model_of(factory, state).init_cache(batch=1, max_length=128)
    for token in [tokenizer.bos_id, *tokenizer.encode(prompt)]:
        next_token, cache = step(params, jnp.asarray([[token]], jnp.int32), cache)
    written = []
    while len(written) < max_new and tokenizer.decode(written[-1:]) != "\n":
        written.append(int(next_token[0]))
        next_token, cache = step(params, next_token[:, None], cache)
    return tokenizer.decode(written)


@pytest.mark.slow
def test_exact_match_agrees_with_greedy_decoding_and_verify():
    """A model that memorised documents 0-3 is evaluated on a config whose held-out set starts at document 1: exact
    match per task equals what greedy decoding plus `synthetic.verify` says, and the memorised answers score."""
    train_config = tiny_train_config(data__num_default_documents=4, optim__learning_rate=1e-2, train__steps=60)
    factory = factory_of(train_config)
    train_step = make_train_step(factory, train_config)
    batches = iter(make_dataset(train_config.data, seq_len=32, global_batch_size=4, vocab_size=272))
    state = factory.init()
    with jax.set_mesh(factory.mesh):
        for _ in range(train_config.train.steps):
            state, _ = train_step(state, next(batches))

    eval_config = tiny_train_config(data__num_default_documents=1, train__eval_every=1, train__eval_task_examples=3)
    metrics = Evaluator(factory_of(eval_config), eval_config).run(state)
    examples = [synthetic.example(0, index) for index in (1, 2, 3)]  # in the training documents 0-3
    verified = {example.task: synthetic.verify(example.prompt, greedy_answer(factory, state, example.prompt))
                for example in examples}  # fmt: skip
    assert {task: metrics[f"eval_exact_match/{task}"] for task in verified} == {
        task: float(right) for task, right in verified.items()}  # fmt: skip
    assert metrics["eval_exact_match"] == np.mean(list(verified.values())) > 0, verified
