"""linear_cross_entropy: chunked custom VJP vs the autodiff reference vs float64 NumPy, fresh random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from pallas_kernels.testing import relative_error


def numpy_loss_and_grads(hidden, kernel, targets, weights):
    """float64 loss and its gradients from the definition: d/dz CE = softmax(z) − one_hot(target)."""
    h, w = hidden.astype(np.float64), kernel.astype(np.float64)
    logits = h @ w
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    losses = -log_probs[np.arange(len(targets)), targets]
    grad_logits = np.exp(log_probs)
    grad_logits[np.arange(len(targets)), targets] -= 1.0
    grad_logits *= weights[:, None]
    return float((losses * weights).sum()), grad_logits @ w.T, h.T @ grad_logits, losses


def random_problem(rng, tokens, hidden_size, vocab):
    hidden = rng.normal(size=(tokens, hidden_size)).astype(np.float32)
    kernel = (rng.normal(size=(hidden_size, vocab)) * 0.3).astype(np.float32)
    targets = rng.integers(0, vocab, tokens).astype(np.int32)
    weights = (rng.uniform(size=tokens) * (rng.uniform(size=tokens) > 0.2) / tokens).astype(np.float32)
    return hidden, kernel, targets, weights


def loss_and_grads(fn, hidden, kernel, targets, weights):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 3)))(hidden, kernel, targets, weights)


def test_reference_matches_float64_numpy(rng):
    hidden, kernel, targets, weights = random_problem(rng, 24, 16, 40)
    loss, (g_hidden, g_kernel, g_weights) = loss_and_grads(linear_cross_entropy_reference, hidden, kernel, targets,
                                                           weights)  # fmt: skip
    expected_loss, e_hidden, e_kernel, e_weights = numpy_loss_and_grads(hidden, kernel, targets, weights)
    assert abs(float(loss) - expected_loss) < 1e-5 * abs(expected_loss)
    for actual, expected in ((g_hidden, e_hidden), (g_kernel, e_kernel), (g_weights, e_weights)):
        assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("tokens, chunk_size", [(24, 8), (29, 8), (24, 64), (33, 5)])
def test_chunked_matches_reference_fp32(rng, tokens, chunk_size):
    """Forward and all three gradients; chunk counts that divide the tokens, that do not (padding), and one chunk."""
    problem = random_problem(rng, tokens, 16, 40)
    chunked = lambda *a: linear_cross_entropy(*a, implementation="chunked", chunk_size=chunk_size)
    loss, grads = loss_and_grads(chunked, *problem)
    expected_loss, expected_grads = loss_and_grads(linear_cross_entropy_reference, *problem)
    assert abs(float(loss) - float(expected_loss)) < 1e-5 * abs(float(expected_loss))
    for name, actual, expected in zip(("hidden", "kernel", "weights"), grads, expected_grads, strict=True):
        assert relative_error(actual, expected) < 1e-5, name


def test_chunked_bf16_hidden_fp32_kernel(rng):
    """The training case: bf16 activations, fp32 master lm_head weight whose gradient comes back in fp32."""
    hidden, kernel, targets, weights = random_problem(rng, 48, 32, 96)
    hidden = jnp.asarray(hidden, jnp.bfloat16)
    chunked = lambda *a: linear_cross_entropy(*a, chunk_size=16)
    loss, (g_hidden, g_kernel, _) = loss_and_grads(chunked, hidden, kernel, targets, weights)
    assert g_hidden.dtype == jnp.bfloat16 and g_kernel.dtype == jnp.float32
    expected_loss, e_hidden, e_kernel, _ = numpy_loss_and_grads(np.asarray(hidden, np.float32), kernel, targets,
                                                                weights)  # fmt: skip
    assert abs(float(loss) - expected_loss) < 1e-2 * abs(expected_loss)
    assert relative_error(g_hidden, e_hidden) < 2e-2
    assert relative_error(g_kernel, e_kernel) < 2e-2


def test_scaled_cotangent_and_no_grad_forward(rng):
    """The backward scales by the incoming cotangent; the plain forward (no differentiation) gives the same loss."""
    problem = random_problem(rng, 20, 8, 24)
    scaled = lambda *a: 3.5 * linear_cross_entropy(*a, chunk_size=8)
    _, grads = loss_and_grads(scaled, *problem)
    _, base = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=8), *problem)
    for actual, expected in zip(grads, base, strict=True):
        np.testing.assert_allclose(np.asarray(actual), 3.5 * np.asarray(expected), rtol=1e-5, atol=1e-8)
    forward_only = jax.jit(lambda *a: linear_cross_entropy(*a, chunk_size=8))(*problem)
    assert abs(float(forward_only) - float(linear_cross_entropy_reference(*problem))) < 1e-5


def test_unknown_implementation():
    with pytest.raises(ValueError, match="^linear_cross_entropy: unknown implementation .fused."):
        linear_cross_entropy(jnp.ones((2, 2)), jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), jnp.ones(2),
                             implementation="fused")  # fmt: skip
