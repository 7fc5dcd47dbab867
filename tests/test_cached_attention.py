"""Attention over a KV cache with left padding: against a float64 NumPy reference (CPU), and tokamax's kernel for
prefill chunks (told the filled length of the cache) against XLA on the GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import causal_attention

SEED = 8080


def reference(q, k, v, offset: int, key_start: np.ndarray) -> np.ndarray:
    """float64: query i (absolute offset + i) of row b attends to keys j <= offset + i on its side of key_start[b]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim)
    query = offset + np.arange(q_len)[:, None]
    key = np.arange(k.shape[1])[None, :]
    start = key_start[:, None, None, None]
    mask = (key <= query)[None, None] & ((key >= start) == (query >= start))
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def inputs(rng, batch, q_len, kv_len, dtype=jnp.float32):
    q = rng.normal(size=(batch, q_len, 4, 16))
    k, v = (rng.normal(size=(batch, kv_len, 2, 16)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize("q_len", [1, 5])
def test_cached_attention_with_left_padding_matches_float64(q_len):
    rng = np.random.default_rng(SEED)
    q, k, v = inputs(rng, 3, q_len, 12)
    key_start = np.asarray([0, 3, 6])  # row 2, q_len 5: queries 4..5 still padding (they see only padding keys)
    for offset in (4, 7):
        got = causal_attention(q, k, v, query_offset=jnp.int32(offset), key_start=jnp.asarray(key_start))
        np.testing.assert_allclose(got, reference(q, k, v, offset, key_start), rtol=2e-5, atol=2e-5,
                                   err_msg=f"offset {offset} (seed {SEED})")  # fmt: skip
    with pytest.raises(ValueError, match="key_start .* needs query_offset"):
        causal_attention(q, k[:, :q_len], v[:, :q_len], key_start=jnp.asarray(key_start))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (tokamax's Mosaic kernel)")
@pytest.mark.parametrize("implementation", [None, "tokamax"])
def test_prefill_chunk_attention_on_gpu_matches_xla(implementation):
    rng = np.random.default_rng(SEED)
    q, k, v = inputs(rng, 2, 256, 2048, jnp.bfloat16)
    key_start = jnp.asarray([0, 100])
    for offset in (0, 512, 1792):  # keys past offset + 256 hold garbage the kernel must not read into the result
        expected = causal_attention(q, k, v, query_offset=offset, key_start=key_start, implementation="xla")
        got = causal_attention(q, k, v, query_offset=offset, key_start=key_start, implementation=implementation)
        error = float(jnp.linalg.norm((got - expected).astype(jnp.float32)) / jnp.linalg.norm(expected.astype(
            jnp.float32)))  # fmt: skip
        assert error < 2e-2, f"offset {offset}: relative error {error:.2e}"
