"""Training–inference alignment: the training forward and prefill + decode give the same next-token log-probs
(fp32, max abs difference <= 1e-4) and the same residual stream after every layer; the CLI prints the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import REPO, randomize_expert_biases, tiny_config

from ring_jax.alignment import compare_paths, document_spans, next_token_logprobs
from ring_jax.model import RingLinearModel

SEED = 6113
SEQ = 24
PREFILL = 2 / 3  # 16 tokens in two chunks of 8, then 8 decode steps

CONFIGS = {
    # layers 1 and 3 softmax (middle and end), one scanned cycle (2-3)
    "softmax_middle_and_end": dict(num_hidden_layers=4, layer_group_size=2),
    # layer 2 softmax, layers 3-4 the softmax tail; MTP head on; all layers unrolled
    "mtp_and_softmax_tail": dict(
        num_hidden_layers=5, layer_group_size=3, num_nextn_predict_layers=1, scan_layers=False
    ),  # fmt: skip
}


def _model(overrides: dict) -> RingLinearModel:
    model = RingLinearModel(tiny_config(**overrides), rngs=nnx.Rngs(SEED))
    randomize_expert_biases(model, seed=SEED)
    return model


def _assert_aligned(report, num_layers: int) -> None:
    assert report.compared.any()
    assert report.max_abs <= 1e-4, f"max |Δ log p| = {report.max_abs:.2e} (seed {SEED})"
    assert report.layer_errors.shape == (num_layers,)
    assert report.layer_errors.max() < 1e-5 and report.hidden_error < 1e-5, report.layer_errors
    assert np.all(report.training[report.compared] < 0)  # real log-probabilities, not zeros


@pytest.mark.parametrize("name", CONFIGS)
def test_training_forward_and_prefill_decode_agree(name):
    model = _model(CONFIGS[name])
    tokens = jnp.asarray(np.random.default_rng(SEED).integers(0, 61, (2, SEQ)), jnp.int32)
    report = compare_paths(model, tokens, prefill_fraction=PREFILL, chunk=8)
    assert report.compared.all() and report.training.shape == (2, SEQ - 1)
    _assert_aligned(report, model.config.num_hidden_layers)


def test_packed_documents_align_with_each_document_decoded_alone():
    model = _model(CONFIGS["softmax_middle_and_end"])
    tokens = jnp.asarray(np.random.default_rng(SEED + 1).integers(0, 61, (1, 2 * SEQ)), jnp.int32)
    segments = jnp.asarray([[1] * SEQ + [2] * SEQ], jnp.int32)
    report = compare_paths(model, tokens, segment_ids=segments, prefill_fraction=PREFILL, chunk=8)
    assert not report.compared[0, SEQ - 1] and report.compared.sum() == 2 * (SEQ - 1)  # no boundary prediction
    _assert_aligned(report, model.config.num_hidden_layers)


def test_next_token_logprobs_match_float64_log_softmax():
    rng = np.random.default_rng(SEED)
    logits = rng.normal(0, 3, (2, 5, 11))
    tokens = rng.integers(0, 11, (2, 5))
    shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    expected = np.take_along_axis(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)), tokens[:, 1:, None], -1)
    got = next_token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens))
    np.testing.assert_allclose(got, expected[..., 0], rtol=1e-5, atol=1e-5)
    assert document_spans(np.asarray([0, 0, 1, 1, 2, 0, 3])) == [(2, 4), (4, 5), (6, 7)]


def test_cli_prints_the_per_layer_table(tmp_path):
    out = tmp_path / "alignment.json"
    overrides = ["--config.model.num_hidden_layers=3", "--config.model.hidden_size=32", "--config.model.head_dim=8",
                 "--config.model.num_experts=4", "--config.model.n_group=2", "--config.model.topk_group=1",
                 "--config.model.intermediate_size=32", "--config.model.moe_intermediate_size=16",
                 "--config.model.moe_shared_expert_intermediate_size=16"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "ring_jax.alignment", "--config=configs/default.py", *overrides, "--seq_len=12",
         "--chunk=4", f"--json={out}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "attention", "mlp", "rel.", "error", "of", "h"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["0", "lightning", "dense"], ["1", "lightning", "moe"], ["2", "softmax", "moe"]
    ]  # fmt: skip
    assert "next-token log-prob |training - inference|: max" in result.stdout
    report = json.loads(out.read_text())
    assert report["tokens"] == 11 and len(report["layer_relative_errors"]) == 3
    assert report["logprob_max_abs_diff"] <= 1e-4
    assert 0 <= report["logprob_mean_abs_diff"] <= report["logprob_max_abs_diff"]
