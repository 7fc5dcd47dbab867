"""Helpers of the model, conversion and training tests: tiny configs, access to a model's weights in the layout of
the float64 NumPy reference, a compiled forward, and child processes with a hard wall-clock deadline.

(`relative_error` and the `seed` / `rng` fixtures live in `pallas_kernels/testing.py`, shared with the kernel tests
and loaded as a pytest plugin by the repository-root `conftest.py`.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import ModelConfig, model_defaults
from ring_jax.configs import default
from ring_jax.model import RingLinearModel, layer_locations

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------------------
# Models


def tiny_config(**overrides: Any) -> ModelConfig:
    """10 layers, G=3: dense layer 0; pre layers 0–2; scanned cycles 3–5 and 6–8; softmax tail layer 9."""
    section = model_defaults()
    section.update(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=10,
        layer_group_size=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        group_norm_size=2,
        intermediate_size=48,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        rope_theta=10000.0,
        max_position_embeddings=512,
    )
    section.update(overrides)
    return ModelConfig.from_config(section)


def randomize_expert_biases(model: RingLinearModel, seed: int = 7) -> None:
    """Non-zero biases so that selection and weighting differ, as in trained checkpoints."""
    from ring_jax.layers.moe import ExpertBias

    state = nnx.state(model, ExpertBias)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(0, 0.3, leaf.shape).astype(np.float32) for leaf in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


def layer_state(model: RingLinearModel, index: int) -> dict:
    """Pure-dict weights of HF layer `index` (unstacked from the scanned cycles when needed)."""
    location = layer_locations(model.config)[index]
    if location[0] == "cycle":
        _, cycle, position = location
        state = nnx.to_pure_dict(nnx.state(model.cycles.layers[position]))
        return jax.tree.map(lambda leaf: np.asarray(leaf[cycle]), state)
    layers = model.pre_layers if location[0] == "pre" else model.post_layers
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(layers[location[1]])))


def _f64(array: Any) -> np.ndarray:
    return np.asarray(array, np.float64)


def _numpy_layer(state: dict) -> dict:
    """One decoder layer's pure-dict weights in the layout of `reference.numpy_ref.decoder_layer`."""
    attention, mlp = state["attention"], state["mlp"]
    layer = {
        "input_norm": _f64(state["input_norm"]["scale"]),
        "post_norm": _f64(state["post_attention_norm"]["scale"]),
        "qkv": _f64(attention["qkv"]["kernel"]),
        "q_norm": _f64(attention["qk"]["q_norm"]["scale"]),
        "k_norm": _f64(attention["qk"]["k_norm"]["scale"]),
        "out": _f64(attention["out"]["kernel"]),
    }
    if "gate" in attention:
        layer.update(attn_gate=_f64(attention["gate"]["kernel"]), out_norm=_f64(attention["out_norm"]["scale"]))
    if "router" in mlp:
        layer.update(
            router=_f64(mlp["router"]["kernel"]),
            expert_bias=_f64(mlp["router"]["expert_bias"]),
            expert_gate=_f64(mlp["experts"]["gate"]),
            expert_up=_f64(mlp["experts"]["up"]),
            expert_down=_f64(mlp["experts"]["down"]),
            shared_gate=_f64(mlp["shared"]["gate"]["kernel"]),
            shared_up=_f64(mlp["shared"]["up"]["kernel"]),
            shared_down=_f64(mlp["shared"]["down"]["kernel"]),
        )
    else:
        layer.update(
            gate_proj=_f64(mlp["gate"]["kernel"]),
            up_proj=_f64(mlp["up"]["kernel"]),
            down_proj=_f64(mlp["down"]["kernel"]),
        )
    return layer


def numpy_weights(model: RingLinearModel) -> dict:
    """The model's weights (float64) in the layout of `reference.numpy_ref.model_logits` / `mtp_logits`."""
    mtp = []
    for block in model.mtp_layers:
        state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(block)))
        mtp.append({
            "embed_norm": _f64(state["embed_norm"]["scale"]),
            "hidden_norm": _f64(state["hidden_norm"]["scale"]),
            "projection": _f64(state["projection"]["kernel"]),
            "final_norm": _f64(state["final_norm"]["scale"]),
            "layer": _numpy_layer(state["layer"]),
        })  # fmt: skip
    return {
        "embed": _f64(model.embed.embedding[...]),
        "final_norm": _f64(model.final_norm.scale[...]),
        "lm_head": _f64(model.lm_head.kernel[...]),
        "layers": [_numpy_layer(layer_state(model, i)) for i in range(model.config.num_hidden_layers)],
        "mtp": mtp,
    }


def jit_forward(model: RingLinearModel) -> Callable[..., Any]:
    """`model.forward` compiled once (eager NNX dispatch is slow); same keyword arguments."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state: Any, tokens: jax.Array, **kwargs: Any) -> Any:
        return nnx.merge(graphdef, state, copy=True).forward(tokens, **kwargs)

    return lambda tokens, **kwargs: forward(state, tokens, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Training


def default_train_config() -> ml_collections.ConfigDict:
    """The default training config (`ring_jax.configs.default`, what `configs/default.py` re-exports)."""
    return default.get_config()


# The architecture of configs/default.py at toy sizes.
TINY_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=3,  # layer 0 dense MLP + lightning, 1 MoE + lightning, 2 MoE + softmax
    layer_group_size=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    group_norm_size=2,
    intermediate_size=64,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=16,
    num_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
)

# The same tiny run as command-line flags of train.py.
TINY_TRAIN_FLAGS = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--config.train.batch_size=4",
    "--config.train.seq_len=32",
    "--config.train.log_every=1",
    "--config.optim.warmup_steps=1",
    "--config.data.num_default_documents=2000",
    "--config.logging.progress_bar=False",
]


def tiny_train_config(**overrides: Any) -> ml_collections.ConfigDict:
    """configs/default.py with TINY_MODEL, 6 steps of 4 × 32 tokens; overrides as `section__field=value`."""
    config = default_train_config()
    config.model.update(TINY_MODEL)
    config.train.batch_size = 4
    config.train.seq_len = 32
    config.train.steps = 6
    config.train.log_every = 1
    config.optim.warmup_steps = 1
    config.optim.learning_rate = 3e-3
    config.checkpoint.every_n_steps = 2
    config.data.num_default_documents = 2000
    config.logging.progress_bar = False
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config


# ------------------------------------------------------------------------------------------------------------------
# Child processes


def cpu_devices_env(count: int) -> dict[str, str]:
    """This process's environment for a child JAX process with `count` virtual CPU devices (the session's XLA flags
    and compilation cache, see the root conftest.py, kept)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


class ChildProcess:
    """A command run in its own process group, stdout and stderr going to `log_file`.

    Every wait has a hard wall-clock deadline, `timeout_s` after the start, that the test checks itself (a child that
    hangs without printing is caught as well); when it passes, the whole process group is killed and the test fails
    with the end of the output. Used as a context manager, the group is killed on exit if it is still running, so a
    failing assertion leaves no process behind.
    """

    def __init__(
        self,
        args: list[str],
        *,
        log_file: str | Path,
        timeout_s: float,
        env: dict[str, str] | None = None,
        cwd: str | Path = REPO,
    ):
        self.log_file = Path(log_file)
        self.name = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(args[:3]))
        self.deadline = time.monotonic() + timeout_s
        with open(self.log_file, "w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.kill()

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_for(self, condition: str | Callable[[], bool], what: str | None = None) -> None:
        """Polls until `condition()` holds (a string: until the output contains it). Fails when the child exits first
        or the deadline passes."""
        holds = (lambda: condition in self.output()) if isinstance(condition, str) else condition
        what = what or repr(condition)
        while not holds():
            if self.process.poll() is not None:
                if holds():  # written just before exiting
                    return
                self._fail(f"exited with code {self.process.returncode} before {what}")
            if time.monotonic() > self.deadline:
                self._fail(f"timed out waiting for {what}")
            time.sleep(0.2)

    def finish(self) -> str:
        """Waits for the child to exit (until the deadline) and returns its whole output."""
        try:
            self.process.wait(timeout=max(self.deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self._fail("still running at the deadline")
        return self.output()

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL to the child's process group while the child runs (a no-op once it has exited and been reaped:
        its id may then belong to another process)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited between the poll and the kill
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def _fail(self, message: str) -> None:
        self.kill()
        pytest.fail(f"{self.name}: {message}; its output ends with:\n{self.output()[-3000:]}", pytrace=False)
