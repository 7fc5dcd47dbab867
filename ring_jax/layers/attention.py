"""GQA softmax-attention layer (every G-th layer) with an optional fixed-size KV cache
(docs/architecture.md#softmax-attention)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import checkify

from pallas_kernels.attention import causal_attention
from ring_jax.config import ModelConfig
from ring_jax.layers.linear import Linear
from ring_jax.layers.norms import RMSNorm
from ring_jax.layers.rope import apply_rope
from ring_jax.sharding import constrain, per_shard


class LayerInputs(NamedTuple):
    """Per-forward values every decoder layer needs.

    cos, sin: [batch, seq, rotary_dim] fp32; segment_ids: [batch, seq] int or None (packed documents);
    cache_length: int32 scalar, tokens already in the caches (0 without a cache); token_mask: [batch, seq] bool or
    None, False for padding (routed like any token but not counted in the expert load); left_padding: [batch] int32
    or None (with a cache only): the first left_padding cache slots of each row hold padding, which enters neither
    a lightning state nor a softmax layer's attention.
    """

    cos: jax.Array
    sin: jax.Array
    segment_ids: jax.Array | None
    cache_length: jax.Array | int
    token_mask: jax.Array | None = None
    left_padding: jax.Array | None = None

    def real_tokens(self, seq: int) -> jax.Array | None:
        """[batch, seq] bool: False for the left padding of a cached call (None when there is none)."""
        if self.left_padding is None:
            return None
        return jnp.arange(seq)[None, :] + self.cache_length >= self.left_padding[:, None]


class KVCache(NamedTuple):
    """keys, values [batch, max_len, kv_heads, head_dim]; filled up to the model cache's `length`."""

    keys: jax.Array
    values: jax.Array


def check_cache_room(max_length: int, cache_length: jax.Array | int, seq: int) -> None:
    """Refuses to write `seq` tokens after `cache_length` into a KV cache of `max_length` slots.

    A chunk longer than the cache fails at trace time; a concrete `cache_length` is checked eagerly. Inside `jit` the
    length is a tracer: the check is then a `checkify.debug_check`, active when the caller wraps the function in
    `jax.experimental.checkify.checkify(fn, errors=checkify.user_checks)` (without it, XLA would clamp the write and
    silently overwrite the last slots; `ring_jax.generate` checks the lengths up front instead).
    """
    if seq > max_length:
        raise ValueError(f"KV cache overflow: {seq} tokens do not fit a cache of max_length={max_length}")
    if isinstance(cache_length, jax.core.Tracer):
        message = f"KV cache overflow: {{}} cached + {seq} new tokens exceed max_length={max_length}"
        checkify.debug_check(cache_length + seq <= max_length, message, cache_length)
        return
    if int(cache_length) + seq > max_length:
        raise ValueError(
            f"KV cache overflow: {int(cache_length)} cached + {seq} new tokens exceed max_length={max_length}"
        )


class QKNormRope(nnx.Module):
    """Per-head RMSNorm on q and k (weights [head_dim] shared by heads), then partial RoPE."""

    def __init__(self, config: ModelConfig):
        eps, param_dtype = config.rms_norm_eps, config.weight_dtype
        self.q_norm = RMSNorm(config.head_dim, eps=eps, param_dtype=param_dtype, names=("head_dim",))
        self.k_norm = RMSNorm(config.head_dim, eps=eps, param_dtype=param_dtype, names=("head_dim",))
        self.use_qk_norm = config.use_qk_norm

    def __call__(self, q: jax.Array, k: jax.Array, inputs: LayerInputs) -> tuple[jax.Array, jax.Array]:
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)


class SoftmaxAttention(nnx.Module):
    """Causal GQA: fused qkv [Q heads | K heads | V heads], QK-norm, partial RoPE, softmax(qkᵀ/√D)v, dense."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kwargs = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs, fp8=config.fp8)
        self.qkv = Linear(config.hidden_size, (heads + 2 * kv_heads) * head_dim, names=("embed", "qkv"), **kwargs)
        self.qk = QKNormRope(config)
        self.out = Linear(heads * head_dim, config.hidden_size, names=("heads", "embed"), **kwargs)

    def __call__(
        self, x: jax.Array, inputs: LayerInputs, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """x [batch, seq, hidden] -> ([batch, seq, hidden], updated cache)."""
        config = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        qkv = self.qkv(x)
        q = qkv[..., : heads * head_dim].reshape(batch, seq, heads, head_dim)
        k, v = jnp.split(qkv[..., heads * head_dim :].reshape(batch, seq, 2 * kv_heads, head_dim), 2, axis=2)
        q, k = self.qk(q, k, inputs)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        if cache is not None:
            check_cache_room(cache.keys.shape[1], inputs.cache_length, seq)
            start = (0, inputs.cache_length, 0, 0)
            cache = KVCache(
                jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start),
                jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start),
            )
            k, v = cache.keys.astype(q.dtype), cache.values.astype(q.dtype)
        q_names = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
        kv_names = ("activation_batch", None, "activation_heads", "activation_head_dim")  # heads split like q's
        attend = per_shard(
            lambda q, k, v, segments, offset, key_start: causal_attention(
                q, k, v, segment_ids=segments, query_offset=offset, key_start=key_start,
                implementation=config.attention_implementation,
            ),
            in_names=(q_names, kv_names, kv_names, ("activation_batch", "activation_length"), None,
                      ("activation_batch",)),
            out_names=q_names,
        )
        cached = cache is not None
        out = attend(q, k, v, inputs.segment_ids, inputs.cache_length if cached else None,
                     inputs.left_padding if cached else None)  # fmt: skip
        return self.out(out.reshape(batch, seq, heads * head_dim)), cache
