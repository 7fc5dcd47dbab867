"""HF ⇄ ring_jax conversion: reference logits, PyTorch-reference parity, bit-identical round trips, CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from reference.hf_checkpoint import random_state_dict, tiny_hf_config, write_hf_checkpoint
from reference.torch_model import TorchRingLinear
from safetensors import safe_open
from support import REPO, cpu_devices_env, jit_forward, tiny_config

from pallas_kernels.testing import relative_error
from ring_jax.config import ModelConfig, model_defaults
from ring_jax.convert import (
    checkpoint_config,
    from_hf,
    from_torch_state_dict,
    load_checkpoint,
    to_hf,
    to_torch_state_dict,
)
from ring_jax.convert.__main__ import main as cli_main
from ring_jax.convert.hf_config import apply_hf_config, model_to_hf_config
from ring_jax.convert.transfer import PERSISTENT
from ring_jax.model import RingLinearModel

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_ring_linear"


def read_hf_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or sharded), as numpy, keyed by name."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="np") as handle:
            for name in handle.keys():  # noqa: SIM118
                tensors[name] = handle.get_tensor(name)
    return tensors


def assert_same_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert actual[name].tobytes() == tensor.tobytes(), f"{name} differs"


@nnx.jit
def logits_of(model: RingLinearModel, tokens: jnp.ndarray) -> jnp.ndarray:
    return model(tokens)


def _tokens(vocab: int, seed: int, batch: int = 2, seq: int = 13) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# Reference logits and parity


def test_torch_reference_reproduces_fixture_logits():
    """Validates the PyTorch reference against logits of another independent implementation (MLX port)."""
    model = TorchRingLinear.from_pretrained(FIXTURE)
    logits = model(torch.from_numpy(np.load(FIXTURE / "tokens.npy")).long()).numpy()
    assert relative_error(logits, np.load(FIXTURE / "logits.npy")) <= 1e-5


def test_from_hf_reproduces_fixture_logits():
    model = from_hf(FIXTURE, jnp.float32, progress=False)
    logits = logits_of(model, jnp.asarray(np.load(FIXTURE / "tokens.npy")))
    assert logits.dtype == jnp.float32
    assert relative_error(logits, np.load(FIXTURE / "logits.npy")) <= 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # L=10, G=3: dense layer 0, pre 0–2, two scanned cycles 3–8, softmax tail layer 9
        {  # L=15, G=4: two dense layers, 6 heads (non-power-of-two slopes), three softmax tail layers 12–14
            "num_hidden_layers": 15,
            "layer_group_size": 4,
            "first_k_dense_replace": 2,
            "num_attention_heads": 6,
            "num_key_value_heads": 3,
            "group_norm_size": 3,
            "num_experts": 12,
            "n_group": 3,
            "topk_group": 2,
            "num_experts_per_tok": 3,
        },
    ],
    ids=["L10_G3", "L15_G4"],
)
def test_parity_with_torch_reference(tmp_path, overrides):
    hf_config = tiny_hf_config(**overrides)
    state_dict = random_state_dict(hf_config, seed=1)
    write_hf_checkpoint(tmp_path / "hf", hf_config, state_dict, num_shards=3)
    tokens = _tokens(hf_config["vocab_size"], seed=2)

    expected = TorchRingLinear.from_pretrained(tmp_path / "hf")(torch.from_numpy(tokens).long()).numpy()
    model = from_hf(tmp_path / "hf", progress=False)
    assert relative_error(logits_of(model, jnp.asarray(tokens)), expected) <= 1e-4
    # The in-memory PyTorch path builds the same model.
    from_torch = from_torch_state_dict(state_dict, hf_config)
    assert relative_error(logits_of(from_torch, jnp.asarray(tokens)), expected) <= 1e-4


def test_decay_layer_offset_reaches_the_model():
    """δ=0 (SGLang convention) changes the logits vs δ=1 (HF) and matches the reference built with δ=0."""
    tokens = np.load(FIXTURE / "tokens.npy")
    expected = TorchRingLinear.from_pretrained(FIXTURE, decay_layer_offset=0)(torch.from_numpy(tokens).long())
    model = from_hf(FIXTURE, overrides={"decay_layer_offset": 0}, progress=False)
    logits = logits_of(model, jnp.asarray(tokens))
    assert relative_error(logits, expected.numpy()) <= 1e-4
    assert relative_error(logits, np.load(FIXTURE / "logits.npy")) > 1e-2


# ----------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hf_round_trip_is_bit_identical(tmp_path, dtype):
    hf_config = tiny_hf_config(torch_dtype=str(dtype).removeprefix("torch."))
    src = tmp_path / "src"
    write_hf_checkpoint(src, hf_config, random_state_dict(hf_config, seed=3, dtype=dtype), num_shards=4)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')

    model = from_hf(src, progress=False)
    to_hf(model, tmp_path / "out", max_shard_size=20_000, like=src, progress=False)

    out = tmp_path / "out"
    assert_same_tensors(read_hf_dir(out), read_hf_dir(src))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((out / file).is_file() for file in index["weight_map"].values())
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k in hf_config} == hf_config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dirs left behind


@pytest.mark.parametrize(
    "overrides",
    [{"num_nextn_predict_layers": 1}, {"use_qk_norm": False, "moe_router_enable_expert_bias": False}],
    ids=["mtp", "no_qk_norm_no_bias"],
)
def test_ring_jax_round_trip_config_variants(tmp_path, overrides):
    """ring_jax → HF → ring_jax restores every parameter for configs the fixture does not cover."""
    config = tiny_config(**overrides)
    model = RingLinearModel(config, rngs=nnx.Rngs(0))
    to_hf(model, tmp_path / "hf", progress=False)
    names = set(read_hf_dir(tmp_path / "hf"))
    if config.num_nextn_predict_layers:
        assert "model.layers.10.eh_proj.weight" in names
        assert "model.layers.10.mlp.experts.7.down_proj.weight" in names
    else:
        assert not any("query_layernorm" in n or "expert_bias" in n for n in names)
    restored = from_hf(tmp_path / "hf", progress=False)
    for a, b in zip(
        nnx.to_flat_state(nnx.state(model, PERSISTENT)),
        nnx.to_flat_state(nnx.state(restored, PERSISTENT)),
        strict=True,
    ):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1].get_value()), np.asarray(b[1].get_value()), err_msg=str(a[0]))


def test_torch_state_dict_round_trip():
    hf_config = tiny_hf_config()
    state_dict = random_state_dict(hf_config, seed=4, dtype=torch.bfloat16)
    model = from_torch_state_dict(state_dict, hf_config)
    exported = to_torch_state_dict(model)
    assert sorted(exported) == sorted(state_dict)
    for name, tensor in state_dict.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    assert exported["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    # A ModelConfig works as well as an HF config dict.
    again = from_torch_state_dict(exported, model.config)
    assert torch.equal(to_torch_state_dict(again)["lm_head.weight"], state_dict["lm_head.weight"])


def test_to_hf_writes_every_spec_field(tmp_path):
    to_hf(from_hf(FIXTURE, progress=False), tmp_path / "hf", dtype=jnp.bfloat16, progress=False)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    spec_fields = json.loads((FIXTURE / "config.json").read_text())
    assert set(spec_fields) - {"torch_dtype"} <= set(written)
    assert written["model_type"] == "bailing_moe_linear"
    assert written["architectures"] == ["BailingMoeLinearV2ForCausalLM"]
    assert written["torch_dtype"] == "bfloat16"
    for ring_only in (
        "decay_layer_offset",
        "dtype",
        "param_dtype",
        "scan_layers",
        "lightning_implementation",
    ):
        assert ring_only not in written
    tensors = read_hf_dir(tmp_path / "hf")
    assert tensors["lm_head.weight"].dtype.name == "bfloat16"
    assert tensors["model.layers.5.mlp.gate.expert_bias"].dtype == np.float32


# ----------------------------------------------------------------------------------------------------
# Multi-token-prediction blocks (docs/architecture.md#multi-token-prediction)


def _mtp_checkpoint(seed: int) -> tuple[dict, dict]:
    """An HF config of the 10-layer model with 2 MTP blocks, and reference weights naming them model.layers.10/11."""
    hf_config = tiny_hf_config(num_nextn_predict_layers=2)
    return hf_config, random_state_dict(hf_config, seed=seed)


def _in_layout(hf_config: dict, state_dict: dict, layout: str) -> tuple[dict, dict]:
    """The same checkpoint with its MTP blocks stored in `layout` (ring_jax.convert.mapping.MTPLayout)."""
    if layout == "inside":  # the Ling-2.0 remote code: num_hidden_layers counts the MTP blocks
        return {**hf_config, "num_hidden_layers": 12}, state_dict
    if layout == "prefixed":
        renamed = {}
        for name, tensor in state_dict.items():
            for depth in range(2):
                name = name.replace(f"model.layers.{10 + depth}.", f"model.mtp.layers.{depth}.")
            renamed[name] = tensor
        return hf_config, renamed
    return hf_config, state_dict


def test_mtp_blocks_match_the_torch_reference(tmp_path, rng):
    """Imported MTP weights give the reference's MTP logits: the names map to the right tensors (enorm vs hnorm,
    the [embedding ‖ hidden] halves of eh_proj, the block's layer)."""
    hf_config, state_dict = _mtp_checkpoint(seed=int(rng.integers(1 << 30)))
    write_hf_checkpoint(tmp_path / "hf", hf_config, state_dict, num_shards=2)
    tokens = rng.integers(0, hf_config["vocab_size"], size=(2, 11)).astype(np.int32)
    reference = TorchRingLinear.from_state_dict(hf_config, state_dict)
    out = jit_forward(from_hf(tmp_path / "hf", progress=False))(jnp.asarray(tokens))
    assert relative_error(out.logits, reference(torch.from_numpy(tokens).long()).numpy()) <= 1e-4
    expected = reference.mtp_logits(torch.from_numpy(tokens).long())
    assert len(out.mtp_logits) == len(expected) == 2
    for depth, (actual, logits) in enumerate(zip(out.mtp_logits, expected, strict=True), start=1):
        assert relative_error(actual[:, :-depth], logits.numpy()[:, :-depth]) <= 1e-4, depth


def test_every_mtp_layout_loads_the_same_weights_and_to_hf_appends_them(tmp_path, caplog):
    hf_config, state_dict = _mtp_checkpoint(seed=8)
    models = {}
    for layout in ("appended", "inside", "prefixed"):
        write_hf_checkpoint(tmp_path / layout, *_in_layout(hf_config, state_dict, layout), num_shards=2)
        with caplog.at_level(logging.WARNING, logger="ring_jax.convert"):
            models[layout] = from_hf(tmp_path / layout, progress=False)
        assert (models[layout].config.num_hidden_layers, models[layout].config.num_nextn_predict_layers) == (10, 2)
    assert caplog.text.count("MTP blocks stored as model.layers.10") == 1  # the Ling-2.0 reinterpretation, said once
    assert "num_hidden_layers=12 counts the 2 MTP blocks" in caplog.text
    expected = nnx.to_flat_state(nnx.state(models["appended"], PERSISTENT))
    for layout in ("inside", "prefixed"):
        for (path, a), (_, b) in zip(expected, nnx.to_flat_state(nnx.state(models[layout], PERSISTENT)), strict=True):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    to_hf(models["prefixed"], tmp_path / "out", progress=False)
    assert_same_tensors(read_hf_dir(tmp_path / "out"), read_hf_dir(tmp_path / "appended"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["num_hidden_layers"], written["num_nextn_predict_layers"]) == (10, 2)


# ----------------------------------------------------------------------------------------------------
# CLI and the ring_jax checkpoint


def test_cli_end_to_end(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for file in ("config.json", "model.safetensors"):
        (src / file).write_bytes((FIXTURE / file).read_bytes())
    (src / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ring_jax.convert",
            "from-hf",
            "--src",
            str(src),
            "--dst",
            str(tmp_path / "ckpt"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr

    # The checkpoint restores into a model that gives the reference logits.
    assert checkpoint_config(tmp_path / "ckpt").decay_layer_offset == 1
    model = load_checkpoint(tmp_path / "ckpt")
    logits = logits_of(model, jnp.asarray(np.load(FIXTURE / "tokens.npy")))
    assert relative_error(logits, np.load(FIXTURE / "logits.npy")) <= 1e-4

    argv = ["to-hf", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "back"), "--no-progress"]
    assert cli_main([*argv, "--max-shard-size", "1MB"]) == 0
    assert_same_tensors(read_hf_dir(tmp_path / "back"), read_hf_dir(FIXTURE))
    assert (tmp_path / "back" / "tokenizer_config.json").read_text() == '{"eos_token": "<eos>"}'
    assert json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    # An existing destination is refused unless --overwrite.
    assert cli_main(argv) == 1
    assert cli_main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "ckpt", "hf"]


def test_hf_config_round_trip_keeps_rope_scaling_and_passthrough_fields():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    hf = tiny_hf_config(rope_scaling=yarn, eos_token_id=60, custom=[1, 2])
    section = model_defaults()
    passthrough = apply_hf_config(section, hf)
    assert passthrough == {"eos_token_id": 60, "pad_token_id": 60, "custom": [1, 2]}
    for config in (section, ModelConfig.from_config(section)):
        written = model_to_hf_config(config, torch_dtype="float32", passthrough=passthrough)
        assert {k: v for k, v in written.items() if k in hf} == hf


MESH_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, "tests")
from reference.hf_checkpoint import random_state_dict, tiny_hf_config, write_hf_checkpoint
from ring_jax.convert import from_hf, hf_to_checkpoint, load_checkpoint
from ring_jax.convert.transfer import PERSISTENT
from pathlib import Path
work = Path(sys.argv[1])
config = tiny_hf_config(vocab_size=64)
write_hf_checkpoint(work / "hf", config, random_state_dict(config, seed=6), num_shards=2)
auto = (jax.sharding.AxisType.Auto,) * 4
mesh = jax.make_mesh((1, 2, 1, 2), ("data", "fsdp", "expert", "tensor"), axis_types=auto)
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
single = from_hf(work / "hf", progress=False)
sharded = from_hf(work / "hf", mesh=mesh, progress=False)
hf_to_checkpoint(work / "hf", work / "ckpt", mesh=mesh, progress=False)
restored = load_checkpoint(work / "ckpt", mesh=mesh)
from ring_jax.convert.__main__ import main
assert main(["from-hf", "--src", str(work / "hf"), "--dst", str(work / "ckpt2"), "--mesh", "fsdp=2,tensor=2"]) == 0
from_cli = load_checkpoint(work / "ckpt2", mesh=mesh)
out = {"embedding": str(sharded.embed.embedding[...].sharding.spec),
       "restored_embedding": str(restored.embed.embedding[...].sharding.spec),
       "experts": str(sharded.cycles.layers[0].mlp.experts.gate[...].sharding.spec),
       "devices": len(sharded.lm_head.kernel[...].sharding.device_set)}
forward = nnx.jit(lambda model, tokens: model(tokens))
models = (single, sharded, restored, from_cli)
out["logits"] = [np.asarray(forward(model, tokens)).tolist() for model in models]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_loading_onto_a_mesh(tmp_path):
    """from_hf / load_checkpoint place every tensor on its NamedSharding (4 CPU devices in a subprocess)."""
    env = cpu_devices_env(4)
    run = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["embedding"] == out["restored_embedding"] == "P('tensor', 'fsdp')"
    assert out["devices"] == 4
    assert "tensor" in out["experts"]
    single, *others = (np.asarray(x) for x in out["logits"])
    for logits in others:
        assert relative_error(logits, single) <= 1e-5
