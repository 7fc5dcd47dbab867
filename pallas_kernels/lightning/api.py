"""Lightning attention op: the table of implementations and the per-platform order `implementation=None` tries
(see `pallas_kernels.dispatch`).

Forward: GPU "pallas_triton", TPU "pallas_mosaic_tpu", CPU the chunked pure-jnp "reference". Decode (one token):
GPU "pallas_triton"; TPU and CPU "reference" (no TPU decode kernel yet). "*_interpret" names run a kernel in Pallas
interpret mode on any backend (slow; for tests and debugging).
"""

from __future__ import annotations

import jax

from pallas_kernels.dispatch import Implementation, Op, on_platform

_GPU, _TPU = on_platform("gpu"), on_platform("tpu")
LIGHTNING_FORWARD = Op(
    "lightning_attention",
    "pallas_kernels.lightning",
    {
        "reference": Implementation("reference:lightning_attention_reference"),
        "recurrent": Implementation("reference:lightning_attention_recurrent"),
        "pallas_triton": Implementation("pallas_triton:lightning_attention_triton", available=_GPU),
        "pallas_triton_interpret": Implementation("pallas_triton:lightning_attention_triton", {"interpret": True}),
        "pallas_mosaic_tpu": Implementation("pallas_mosaic_tpu:lightning_attention_mosaic_tpu", available=_TPU),
        "pallas_mosaic_tpu_interpret": Implementation(
            "pallas_mosaic_tpu:lightning_attention_mosaic_tpu", {"interpret": True}
        ),
    },
    {"gpu": ("pallas_triton",), "tpu": ("pallas_mosaic_tpu",), "cpu": ("reference",)},
)
LIGHTNING_DECODE = Op(
    "lightning_attention_decode",
    "pallas_kernels.lightning",
    {
        "reference": Implementation("reference:lightning_decode_reference"),
        "pallas_triton": Implementation("pallas_triton:lightning_decode_triton", available=_GPU),
        "pallas_triton_interpret": Implementation("pallas_triton:lightning_decode_triton", {"interpret": True}),
    },
    {"gpu": ("pallas_triton",), "tpu": ("reference",), "cpu": ("reference",)},
)


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
    **kernel_options,
) -> tuple[jax.Array, jax.Array]:
    """Lightning attention over a sequence.

    Args:
      q, k, v: [batch, seq, heads, head_dim] (bf16 or fp32).
      decay_rate: [heads] positive; per-step decay exp(-decay_rate).
      scale: default head_dim**-0.5.
      initial_state: [batch, heads, head_dim, head_dim] fp32 or None (zeros).
      segment_ids: [batch, seq] int or None; the state resets where the id changes from the previous token.
      implementation: a name of `LIGHTNING_FORWARD` or None (the platform's order).
      **kernel_options: tuning passed to the chosen kernel (e.g. chunk, block_v, splits for "pallas_triton").

    Returns:
      out [batch, seq, heads, head_dim] in q's dtype, final_state [batch, heads, head_dim, head_dim] fp32.
    """
    fn = LIGHTNING_FORWARD.resolve(implementation)
    return fn(q, k, v, decay_rate, scale=scale, initial_state=initial_state, segment_ids=segment_ids, **kernel_options)


def lightning_attention_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay_rate: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    implementation: str | None = None,
    **kernel_options,
) -> tuple[jax.Array, jax.Array]:
    """One decode step: q, k, v [batch, heads, head_dim]; state [batch, heads, head_dim, head_dim] fp32.

    Returns out [batch, heads, head_dim] in q's dtype and the new state. The "pallas_triton" kernel donates
    `state` and updates it in place: do not use the passed-in state afterwards.
    """
    fn = LIGHTNING_DECODE.resolve(implementation)
    return fn(q, k, v, decay_rate, state, scale=scale, **kernel_options)
