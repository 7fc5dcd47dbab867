"""The dispatch contract shared by every op: None follows the platform's order (and logs what ran), an explicit name
is strict (unknown, unavailable or unsupported for the call is a one-line error, never a fallback)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import ATTENTION, causal_attention
from pallas_kernels.dispatch import Implementation, Op, always_available, at_default_precision, on_platform
from pallas_kernels.gmm import GROUPED_MATMUL
from pallas_kernels.lightning.api import LIGHTNING_DECODE, LIGHTNING_FORWARD
from pallas_kernels.linear_cross_entropy import LINEAR_CROSS_ENTROPY

ALL_OPS = (ATTENTION, GROUPED_MATMUL, LIGHTNING_FORWARD, LIGHTNING_DECODE, LINEAR_CROSS_ENTROPY)


def test_every_op_has_an_implementation_for_the_cpu_that_runs_here():
    assert jax.default_backend() == "cpu"
    expected = {"causal_attention": "xla", "grouped_matmul": "ragged_dot", "lightning_attention": "reference",
                "lightning_attention_decode": "reference", "linear_cross_entropy": "chunked"}  # fmt: skip
    assert {op.name: op.select(None) for op in ALL_OPS} == expected
    for op in ALL_OPS:
        for name in op.names():  # every listed target exists (imports and resolves)
            if op.unavailable_reason(name) is None:
                assert callable(op.function(name))


def test_explicit_names_are_strict():
    with pytest.raises(ValueError, match=r"^grouped_matmul: unknown implementation 'megablox'; choose from"):
        GROUPED_MATMUL.select("megablox")
    with pytest.raises(ValueError, match=r"^lightning_attention: implementation 'pallas_triton' cannot run here: "
                                         r"needs a gpu backend \(this one is cpu\)$"):  # fmt: skip
        LIGHTNING_FORWARD.select("pallas_triton")
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="causal_attention: implementation 'tokamax' cannot run here"):
        causal_attention(q, q, q, implementation="tokamax")


def test_none_skips_what_cannot_run_and_logs_the_choice(caplog, monkeypatch):
    op = Op(
        "toy",
        "pallas_kernels.gmm",
        {
            "elsewhere": Implementation("xla:grouped_matmul_ragged_dot", available=on_platform("tpu")),
            "picky": Implementation("xla:grouped_matmul_ragged_dot"),
            "plain": Implementation("reference:grouped_matmul_reference"),
        },
        {"cpu": ("elsewhere", "picky", "plain")},
    )
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels"):
        assert op.select(None, supports=lambda name: "too picky" if name == "picky" else None) == "plain"
    assert "toy: using 'plain' on cpu (skipped: elsewhere: needs a tpu backend" in caplog.text
    assert "picky: too picky" in caplog.text
    with pytest.raises(ValueError, match="toy: implementation 'picky' cannot run here: too picky"):
        op.select("picky", supports=lambda name: "too picky")
    with pytest.raises(ValueError, match="toy: no implementation can run this call on cpu"):
        op.select(None, supports=lambda name: "never")
    with pytest.raises(ValueError, match="names unknown implementations"):
        Op("bad", "pallas_kernels.gmm", {}, {"cpu": ("missing",)})


def test_resolved_functions_compute_the_op():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    sizes = jnp.array([2, 3])  # row 5 is padding: zeros
    ragged = GROUPED_MATMUL.resolve("ragged_dot")(lhs, rhs, sizes)
    reference = GROUPED_MATMUL.resolve("reference")(lhs, rhs, sizes)
    np.testing.assert_allclose(ragged, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(reference[5], 0.0)


def test_tokamax_gives_way_to_xla_at_a_non_default_precision():
    """tokamax raises on jax_default_matmul_precision="highest" (set by the test suite); the GPU orders of the
    grouped matmul and attention then take XLA instead of failing."""
    available = at_default_precision(always_available)
    with jax.default_matmul_precision("highest"):
        assert "default matmul precision" in available()
    with jax.default_matmul_precision("default"):
        assert available() is None
