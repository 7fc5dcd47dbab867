"""checkpoint.init_from: a run starts from an HF folder, a from-hf output (or a hub id when online), with the model
section of the weights, their exact values in the sharded train state, a fresh optimizer; bad sources fail naming
the problem before anything is written."""

from __future__ import annotations

import json
import socket
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from reference.hf_checkpoint import random_state_dict, tiny_hf_config, write_hf_checkpoint
from safetensors.numpy import load_file
from support import TINY_MODEL, ChildProcess, cpu_devices_env, tiny_train_config

from ring_jax.convert import from_hf, hf_to_checkpoint
from ring_jax.convert.__main__ import main as cli_main
from ring_jax.data.errors import DataError
from ring_jax.layers.moe import ExpertBias
from ring_jax.sharding import make_mesh
from ring_jax.train import init_from
from ring_jax.train.init_from import InitFromError
from ring_jax.train.loop import train
from ring_jax.train.optim import make_optimizer
from ring_jax.train.state import StateFactory, validate

# The tiny training model's architecture as an HF config.json, with a narrower dense MLP and another RoPE base, so
# that the run's model section visibly comes from the weights.
HF_FIELDS = {**TINY_MODEL, "vocab_size": 272, "intermediate_size": 48, "rope_theta": 50000.0}


def write_hf(directory, seed, **overrides):
    config = tiny_hf_config(**{**HF_FIELDS, **overrides})
    write_hf_checkpoint(directory, config, random_state_dict(config, seed=seed), num_shards=2)
    return directory


def initial_state(config):
    config, source = init_from.resolve(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    factory = StateFactory(validate(config), tx, make_mesh(config.mesh, use_all=True), seed=0)
    return config, factory, init_from.initial_state(factory, source)


def assert_same_weights(state, model):
    _, params, expert_bias, _ = nnx.split(model, nnx.Param, ExpertBias, ...)
    expected = jax.device_get((params, expert_bias))
    got = jax.device_get((state.params, state.expert_bias))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_hf_folder_and_from_hf_output_give_their_model_and_exact_weights(tmp_path, seed, capsys):
    hf = write_hf(tmp_path / "hf", seed)
    hf_to_checkpoint(hf, tmp_path / "ckpt", progress=False)
    expected = from_hf(hf, progress=False)
    for source in (hf, tmp_path / "ckpt"):
        config, factory, state = initial_state(tiny_train_config(checkpoint__init_from=str(source)))
        assert (config.model.intermediate_size, config.model.rope_theta, config.model.vocab_size) == (48, 5e4, 272)
        assert "intermediate_size 64 -> 48" in capsys.readouterr().out
        assert_same_weights(state, expected)
        assert int(state.step) == 0
        assert all(not np.any(leaf) for leaf in jax.tree.leaves(jax.device_get(state.opt_state)))
        shardings = jax.tree.leaves(factory.shardings.params)
        assert [leaf.sharding for leaf in jax.tree.leaves(state.params)] == shardings


def test_model_fields_kept_by_overrides_must_still_fit_the_weights(tmp_path):
    hf = write_hf(tmp_path / "hf", 0)
    config = tiny_train_config(checkpoint__init_from=str(hf), model__rope_theta=20000.0)
    init_from.keep_overridden_model_fields(config, {"model.rope_theta": 20000.0, "train.steps": 3})  # train.py's flags
    assert config.checkpoint.init_from_overrides == "rope_theta"
    config, _, _ = initial_state(config)
    assert (config.model.rope_theta, config.model.intermediate_size) == (20000.0, 48)  # a shapeless field kept
    mismatch = tiny_train_config(checkpoint__init_from=str(hf), checkpoint__init_from_overrides="intermediate_size")
    with pytest.raises(InitFromError, match=r"parameter pre_layers/0/mlp/down/kernel has shape \[48, 32\] in .*hf "
                                            r"but shape \[64, 32\] for this config.model"):  # fmt: skip
        train(mismatch, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(InitFromError, match="checkpoint.init_from_overrides: 'widht' is not a config.model field"):
        init_from.resolve(tiny_train_config(checkpoint__init_from=str(hf), checkpoint__init_from_overrides="widht"))


def test_bad_sources_fail_before_anything_is_written(tmp_path, monkeypatch):
    small_vocab = write_hf(tmp_path / "small", 0, vocab_size=200)
    with pytest.raises(DataError, match=r"data.tokenizer: 'bytes' has 259 tokens but model.vocab_size=200"):
        train(tiny_train_config(checkpoint__init_from=str(small_vocab)), str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InitFromError, match=r"checkpoint.init_from: .*empty is not an HF folder .*, a `python -m "
                                            r"ring_jax.convert from-hf` output .* or a training workdir"):  # fmt: skip
        train(tiny_train_config(checkpoint__init_from=str(tmp_path / "empty")), str(tmp_path / "run"))
    with pytest.raises(InitFromError, match=r"'nowhere/x.y/z' is not a directory \(nor an HF hub id"):
        train(tiny_train_config(checkpoint__init_from="nowhere/x.y/z"), str(tmp_path / "run"))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    offline = r"cannot download 'someone/ring-model' from the Hugging Face hub .*`hf download someone/ring-model"
    with pytest.raises(InitFromError, match=offline + " --local-dir ring-model`"):
        train(tiny_train_config(checkpoint__init_from="someone/ring-model"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def read_hf_dir(directory):
    return {name: array for file in sorted(directory.glob("*.safetensors")) for name, array in load_file(file).items()}


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype and actual[name].tobytes() == array.tobytes(), name


@pytest.mark.slow
def test_hf_weights_survive_training_at_learning_rate_zero_and_export_bit_identical(tmp_path, seed, capsys):
    """HF folder -> train (learning rate 0, no expert-bias updates) -> HF exports during training and `to-hf` of the
    workdir's steps: the same bytes; a new run started from the workdir holds the same weights again."""
    hf = write_hf(tmp_path / "hf", seed)
    (hf / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    config = tiny_train_config(checkpoint__init_from=str(hf), optim__learning_rate=0.0, optim__bias_update_rate=0.0,
                               train__steps=4, checkpoint__hf_export_every=2, checkpoint__keep=2)  # fmt: skip
    result = train(config, str(tmp_path / "run"))
    assert result.final_step == 4 and all(np.isfinite(list(result.losses.values())))
    source = read_hf_dir(hf)
    assert sorted(path.name for path in (tmp_path / "run" / "hf").iterdir()) == ["step_2", "step_4"]
    for step in (2, 4):
        assert cli_main(["to-hf", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / f"out{step}"), "--step",
                         str(step), "--max-shard-size", "20KB", "--no-progress"]) == 0  # fmt: skip
        assert f"step {step} of {tmp_path / 'run'}: wrote" in capsys.readouterr().out
    for exported in (tmp_path / "run" / "hf" / "step_2", tmp_path / "run" / "hf" / "step_4", tmp_path / "out2",
                     tmp_path / "out4"):  # fmt: skip
        assert_same_tensors(read_hf_dir(exported), source)
        written = json.loads((exported / "config.json").read_text())
        assert (written["eos_token_id"], written["intermediate_size"], written["torch_dtype"]) == (60, 48, "float32")
        assert (exported / "tokenizer_config.json").read_text() == '{"eos_token": "<eos>"}'
    assert (tmp_path / "out4" / "model.safetensors.index.json").is_file(), "several shards of at most 20 KB"

    # --dtype: bfloat16 tensors (expert biases stay fp32), latest step by default.
    assert cli_main(["to-hf", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16",
                     "--no-progress"]) == 0  # fmt: skip
    bf16 = read_hf_dir(tmp_path / "bf16")
    for name, array in source.items():
        expected = array if name.endswith("expert_bias") else array.astype(ml_dtypes.bfloat16)
        assert bf16[name].dtype == expected.dtype and bf16[name].tobytes() == expected.tobytes(), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # Another run starting from this workdir takes its model and (latest) weights.
    config, _, state = initial_state(tiny_train_config(checkpoint__init_from=str(tmp_path / "run")))
    assert config.model.intermediate_size == 48
    assert_same_weights(state, from_hf(hf, progress=False))


def test_export_and_init_from_a_workdir_without_a_complete_checkpoint_fail_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / ".3.orbax-checkpoint-tmp-0").mkdir(parents=True)  # a save killed midway
    (run / "config.json").write_text(tiny_train_config().to_json())
    assert cli_main(["to-hf", "--src", str(run), "--dst", str(tmp_path / "out"), "--no-progress"]) == 1
    assert f"{run / 'checkpoints'}: no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(InitFromError, match="checkpoint.init_from: .*checkpoints: no complete checkpoint"):
        initial_state(tiny_train_config(checkpoint__init_from=str(run)))
    assert cli_main(["to-hf", "--src", str(tmp_path), "--dst", str(tmp_path / "out"), "--step", "3"]) == 1
    assert "--step needs a training workdir" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


MESH_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from pathlib import Path
import jax, numpy as np
from flax import nnx
from reference.hf_checkpoint import random_state_dict, tiny_hf_config, write_hf_checkpoint
from support import tiny_train_config
from ring_jax.convert import from_hf, hf_to_checkpoint
from ring_jax.layers.moe import ExpertBias
from ring_jax.sharding import make_mesh
from ring_jax.train import init_from
from ring_jax.train.optim import make_optimizer
from ring_jax.train.state import StateFactory, validate
work, fields = Path(sys.argv[1]), json.loads(sys.argv[2])
hf_config = tiny_hf_config(**fields)
write_hf_checkpoint(work / "hf", hf_config, random_state_dict(hf_config, seed=3), num_shards=2)
hf_to_checkpoint(work / "hf", work / "ckpt", progress=False)
_, params, bias, _ = nnx.split(from_hf(work / "hf", progress=False), nnx.Param, ExpertBias, ...)
expected = jax.device_get((params, bias))
out = {}
for source in ("hf", "ckpt"):
    config = tiny_train_config(checkpoint__init_from=str(work / source), mesh__fsdp=2, mesh__tensor=2)
    config, found = init_from.resolve(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    factory = StateFactory(validate(config), tx, make_mesh(config.mesh, use_all=True), seed=0)
    state = init_from.initial_state(factory, found)
    got = jax.tree.leaves((state.params, state.expert_bias))
    out[source] = {
        "same_values": all(np.asarray(a).tobytes() == b.tobytes() for a, b in zip(got, jax.tree.leaves(expected))),
        "same_shardings": [leaf.sharding for leaf in got] == jax.tree.leaves((factory.shardings.params,
                                                                               factory.shardings.expert_bias)),
        "embedding": list(state.params["embed"]["embedding"].get_value().sharding.spec),
        "split_leaves": sum(len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated
                            for leaf in got),
    }
print(json.dumps(out))
"""


def test_weights_land_in_their_shards_on_a_mesh(tmp_path):
    """4 CPU devices, fsdp=2 x tensor=2: every leaf of the initial state has the train state's sharding and the
    source's exact values, from an HF folder and from a from-hf output."""
    env = cpu_devices_env(4)
    with ChildProcess([sys.executable, "-c", MESH_SCRIPT, str(tmp_path), json.dumps(HF_FIELDS)], env=env,
                      log_file=tmp_path / "mesh.log", timeout_s=600) as child:  # fmt: skip
        output = child.finish()
    assert child.returncode == 0, output[-3000:]
    result = json.loads(output.strip().splitlines()[-1])
    for source in ("hf", "ckpt"):
        assert result[source]["same_values"] and result[source]["same_shardings"], result
        assert result[source]["embedding"] == ["tensor", "fsdp"]
        assert result[source]["split_leaves"] > 10
