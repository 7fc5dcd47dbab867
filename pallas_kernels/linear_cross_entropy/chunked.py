"""Chunked lm_head + cross-entropy with the gradient formed in the forward pass (custom VJP).

Unfused, a training step writes [tokens, vocab] fp32 logits (5 GB for 8192 tokens of Ring's 157K vocabulary),
reads them several times for the log-softmax, and autodiff of the fp32-output matmul runs the two backward GEMMs
with an fp32 cotangent. Here tokens go through in chunks: each chunk's logits live only inside one scan step, and
because the loss is a scalar, the forward rule already computes d loss / d logits = weights · (softmax − one_hot)
in fp32, casts it to the compute dtype and runs the two gradient GEMMs there. Three GEMMs in the compute dtype
in all, never a recomputation; the backward only scales the saved gradients by the incoming cotangent.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.linear_cross_entropy.reference import token_losses


def _split(x: jax.Array, num_chunks: int) -> jax.Array:
    """[rows, ...] -> [num_chunks, rows / num_chunks, ...], chunk c = rows c, c + num_chunks, ...: strided, so that
    rows sharded in contiguous blocks over devices leave every chunk evenly spread over them."""
    return jnp.swapaxes(x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]), 0, 1)


def _merge(x: jax.Array) -> jax.Array:
    """Inverse of `_split`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _chunks(hidden, targets, weights, chunk_size) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(hidden, targets, weights) padded to whole chunks and split: each [num_chunks, chunk_size, ...]."""
    tokens = hidden.shape[0]
    num_chunks = -(-tokens // chunk_size)
    pad = num_chunks * chunk_size - tokens if num_chunks > 1 else 0
    if pad:  # padded rows have weight 0: no loss, no gradient
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    return tuple(_split(a, num_chunks) for a in (hidden, targets, weights))


def _chunk_logits(hidden_chunk: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.dot(hidden_chunk, kernel, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_cross_entropy_chunked(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, chunk_size: int
) -> jax.Array:
    """Σ_t weights[t] · CE(hidden[t] @ kernel, targets[t]), fp32 scalar; shapes as in the reference.

    chunk_size: tokens per chunk (the live logits are [chunk_size, vocab] fp32).
    """
    kernel = kernel.astype(hidden.dtype)

    def chunk_loss(total, chunk):
        hidden_chunk, target_chunk, weight_chunk = chunk
        losses = token_losses(_chunk_logits(hidden_chunk, kernel), target_chunk)
        return total + jnp.sum(losses * weight_chunk), None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), _chunks(hidden, targets, weights, chunk_size))
    return total


def _fwd(hidden, kernel, targets, weights, chunk_size):
    tokens = hidden.shape[0]
    compute_kernel = kernel.astype(hidden.dtype)
    vocab = kernel.shape[1]

    def chunk_step(carry, chunk):
        total, grad_kernel = carry
        hidden_chunk, target_chunk, weight_chunk = chunk
        logits = _chunk_logits(hidden_chunk, compute_kernel)
        log_normaliser = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        losses = token_losses(logits, target_chunk)
        one_hot = jnp.arange(vocab, dtype=target_chunk.dtype)[None, :] == target_chunk[:, None]
        grad_logits = ((jnp.exp(logits - log_normaliser) - one_hot) * weight_chunk[:, None]).astype(hidden.dtype)
        grad_hidden = jnp.dot(grad_logits, compute_kernel.T, preferred_element_type=jnp.float32)
        grad_kernel = grad_kernel + jnp.dot(hidden_chunk.T, grad_logits, preferred_element_type=jnp.float32)
        return (total + jnp.sum(losses * weight_chunk), grad_kernel), (grad_hidden.astype(hidden.dtype), losses)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    chunks = _chunks(hidden, targets, weights, chunk_size)
    (total, grad_kernel), (grad_hidden, losses) = jax.lax.scan(chunk_step, init, chunks)
    grad_hidden, losses = _merge(grad_hidden)[:tokens], _merge(losses)[:tokens]
    return total, (grad_hidden, grad_kernel.astype(kernel.dtype), losses)


def _bwd(chunk_size, residuals, cotangent):
    del chunk_size
    grad_hidden, grad_kernel, losses = residuals
    return (
        (grad_hidden * cotangent).astype(grad_hidden.dtype),
        grad_kernel * cotangent.astype(grad_kernel.dtype),
        None,  # integer targets
        losses * cotangent,
    )


linear_cross_entropy_chunked.defvjp(_fwd, _bwd)
