"""Lightning attention op: picks an implementation per platform.

`implementation=None` uses the Pallas kernel of the default backend when there is one (GPU: "pallas_triton",
TPU: "pallas_mosaic_tpu"; decode on TPU has no kernel yet) and the chunked pure-jnp reference elsewhere (CPU).
"*_interpret" names run a kernel in Pallas interpret mode (any backend; slow, for tests and debugging).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import jax

# name -> (module in this package, function, extra keyword arguments); kernels are imported on first use.
_FORWARD: dict[str, tuple[str, str, dict]] = {
    "reference": ("reference", "lightning_attention_reference", {}),
    "recurrent": ("reference", "lightning_attention_recurrent", {}),
    "pallas_triton": ("pallas_triton", "lightning_attention_triton", {}),
    "pallas_triton_interpret": ("pallas_triton", "lightning_attention_triton", {"interpret": True}),
    "pallas_mosaic_tpu": ("pallas_mosaic_tpu", "lightning_attention_mosaic_tpu", {}),
    "pallas_mosaic_tpu_interpret": ("pallas_mosaic_tpu", "lightning_attention_mosaic_tpu", {"interpret": True}),
}
_DECODE: dict[str, tuple[str, str, dict]] = {
    "reference": ("reference", "lightning_decode_reference", {}),
    "pallas_triton": ("pallas_triton", "lightning_decode_triton", {}),
    "pallas_triton_interpret": ("pallas_triton", "lightning_decode_triton", {"interpret": True}),
}
_PLATFORM_DEFAULT = {"gpu": "pallas_triton", "tpu": "pallas_mosaic_tpu"}
FORWARD_IMPLEMENTATIONS = tuple(_FORWARD)
DECODE_IMPLEMENTATIONS = tuple(_DECODE)


def _pick(table: dict[str, tuple[str, str, dict]], implementation: str | None) -> Callable:
    if implementation is None:
        implementation = _PLATFORM_DEFAULT.get(jax.default_backend(), "reference")
        if implementation not in table:  # e.g. decode on TPU: no kernel yet
            implementation = "reference"
    if implementation not in table:
        raise ValueError(f"implementation={implementation!r}: expected one of {sorted(table)} or None")
    module, name, kwargs = table[implementation]
    fn = getattr(importlib.import_module(f"pallas_kernels.lightning.{module}"), name)
    return functools.partial(fn, **kwargs) if kwargs else fn


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
      implementation: None (per platform), "reference", "recurrent", "pallas_triton", "pallas_mosaic_tpu"
        (or their "*_interpret" variants).
      **kernel_options: tuning passed to the chosen kernel (e.g. chunk, block_v, splits for "pallas_triton").

    Returns:
      out [batch, seq, heads, head_dim] in q's dtype, final_state [batch, heads, head_dim, head_dim] fp32.
    """
    fn = _pick(_FORWARD, implementation)
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
    fn = _pick(_DECODE, implementation)
    return fn(q, k, v, decay_rate, state, scale=scale, **kernel_options)
