"""model.fp8: which matmuls run in blockwise FP8 (every projection and expert GEMM; never the router or lm_head),
the layers' numerics with it, and training the default config with the emulated recipe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import default_train_config, tiny_config

from pallas_kernels.fp8 import blockwise_matmul
from pallas_kernels.testing import relative_error
from ring_jax.config import ConfigError
from ring_jax.layers import linear
from ring_jax.layers.linear import Linear
from ring_jax.layers.mlp import SwiGLU
from ring_jax.layers.moe import dispatch
from ring_jax.model import abstract_model
from ring_jax.train.loop import train


def _tokens(config, seed=0, batch=2, seq=24):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq)), jnp.int32)


def test_fp8_mode_is_validated():
    message = r"^model.fp8: must be one of \('none', 'emulated', 'native', 'pallas_triton'"
    with pytest.raises(ConfigError, match=message):
        tiny_config(fp8="e4m3")


def test_fp8_modes_name_the_kernel_routes():
    """model.fp8 "emulated" is the reference recipe, "native" the platform's order, a route's name that route."""
    assert linear.fp8_implementation("emulated") == "reference"
    assert linear.fp8_implementation("native") is None
    assert tiny_config(fp8="pallas_mosaic_gpu").fp8 == "pallas_mosaic_gpu"
    assert linear.fp8_implementation("pallas_mosaic_gpu") == "pallas_mosaic_gpu"
    x, w = jnp.ones((4, 128)), jnp.ones((128, 8))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="implementation 'pallas_mosaic_gpu' cannot run here"):
            linear.blockwise_matmul(x, w, implementation=linear.fp8_implementation("pallas_mosaic_gpu"))


@pytest.mark.parametrize("fp8", ["none", "emulated"])
def test_every_projection_and_expert_gemm_runs_in_fp8_but_not_router_or_lm_head(fp8, monkeypatch):
    config = tiny_config(fp8=fp8, scan_layers=False, num_nextn_predict_layers=1)
    dense, grouped = [], []

    def record(calls, fn):
        def wrapped(lhs, rhs, *args, **kwargs):
            calls.append(tuple(rhs.shape))
            return fn(lhs, rhs, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(linear, "blockwise_matmul", record(dense, linear.blockwise_matmul))
    monkeypatch.setattr(dispatch, "blockwise_grouped_matmul", record(grouped, dispatch.blockwise_grouped_matmul))
    graphdef, state = nnx.split(abstract_model(config))  # shapes only: tracing is all this test needs
    jax.make_jaxpr(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, _tokens(config))
    if fp8 == "none":
        assert dense == [] and grouped == []
        return
    layers = range(config.num_hidden_layers)
    softmax = sum(config.is_softmax_layer(i) for i in layers) + 1  # + the MTP block's softmax layer
    lightning = config.num_hidden_layers - sum(config.is_softmax_layer(i) for i in layers)
    moe = config.num_moe_layers + 1
    dense_mlp = config.num_hidden_layers - config.num_moe_layers
    # lightning qkv/gate/out, softmax qkv/out, SwiGLU gate/up/down (dense MLPs and shared experts), MTP projection
    assert len(dense) == 3 * lightning + 2 * softmax + 3 * (dense_mlp + moe) + 1
    assert len(grouped) == 2 * moe  # gate|up and down of the routed experts
    hidden = config.hidden_size
    assert (hidden, config.vocab_size) not in dense and (hidden, config.num_experts) not in dense


def test_fp8_layers_stay_close_to_full_precision():
    """A layer carries FP8 rounding of a few percent. (A deep random-init model amplifies any perturbation of that
    size, FP8 or not, so closeness is judged per layer; the whole model by the training test below.)"""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 24, 32)), jnp.float32)
    swiglu = {fp8: SwiGLU(32, 48, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0), fp8=fp8)
              for fp8 in ("none", "emulated")}  # fmt: skip
    error = relative_error(swiglu["emulated"](x), swiglu["none"](x))
    assert 1e-3 < error < 0.1, error


def test_fp8_linear_returns_the_compute_dtype_and_a_parameter_dtype_gradient():
    rng = np.random.default_rng(3)
    layer = Linear(200, 72, names=("embed", "mlp"), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                   fp8="emulated")  # fmt: skip
    x = jnp.asarray(rng.normal(size=(2, 5, 200)), jnp.bfloat16)
    kernel = layer.kernel[...]
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x).astype(jnp.float32) ** 2)

    grad_state, grad_x = jax.grad(loss, argnums=(0, 1))(state, x)
    grad_kernel = grad_state["kernel"][...]
    expected = jax.grad(lambda k, x: jnp.sum(blockwise_matmul(x, k, implementation="reference").astype(jnp.float32)
                                             ** 2), argnums=(0, 1))(kernel, x)  # fmt: skip
    assert layer(x).dtype == jnp.bfloat16 and grad_kernel.dtype == jnp.float32 and grad_x.dtype == jnp.bfloat16
    assert relative_error(grad_kernel, expected[0]) < 1e-6 and relative_error(grad_x, expected[1]) < 1e-6


@pytest.mark.slow
def test_fp8_trains_the_default_config_within_two_percent(tmp_path):
    """configs/default.py for 200 steps, with and without FP8 (same data, same initial weights): the final losses
    (mean of the last 20 steps) agree within 2%. The emulated recipe on CPU / TPU, the kernels on a GPU."""

    def final_loss(fp8: str) -> float:
        config = default_train_config()
        config.model.fp8 = fp8
        config.train.update(steps=200, log_every=50)
        config.checkpoint.every_n_steps = 0
        config.logging.update(progress_bar=False, tensorboard=False)
        losses = train(config, str(tmp_path / fp8)).losses
        return float(np.mean([losses[step] for step in range(181, 201)]))

    mode = "native" if jax.default_backend() == "gpu" else "emulated"
    full, fp8 = final_loss("none"), final_loss(mode)
    print(f"default config, mean loss of steps 181-200: fp8=none {full:.4f}, fp8={mode} {fp8:.4f}")
    assert abs(fp8 - full) <= 0.02 * full, (full, fp8)
