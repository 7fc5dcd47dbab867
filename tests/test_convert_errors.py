"""Bad conversion input fails early, naming the tensor / field and the file; nothing half-written."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from reference.hf_checkpoint import random_state_dict, tiny_hf_config, write_hf_checkpoint

from ring_jax.convert import CheckpointError, HFConfigError, checkpoint_to_hf, from_hf, from_torch_state_dict
from ring_jax.convert.__main__ import main as cli_main


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return random_state_dict(tiny_hf_config(), seed=5)


def _write(tmp_path: Path, state: dict, config: dict | None = None, num_shards: int = 2) -> Path:
    write_hf_checkpoint(tmp_path / "hf", config or tiny_hf_config(), state, num_shards=num_shards)
    return tmp_path / "hf"


def _shard_of(directory: Path, name: str) -> str:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_missing_tensor(tmp_path, state_dict):
    name = "model.layers.4.mlp.experts.3.up_proj.weight"
    hf = _write(tmp_path, {k: v for k, v in state_dict.items() if k != name})
    with pytest.raises(CheckpointError, match=re.escape(f"missing tensor '{name}'")):
        from_hf(hf, progress=False)


def test_unexpected_tensor(tmp_path, state_dict):
    hf = _write(tmp_path, {**state_dict, "model.layers.2.attention.bogus.weight": torch.zeros(3)})
    shard = _shard_of(hf, "model.layers.2.attention.bogus.weight")
    with pytest.raises(
        CheckpointError, match=rf"unexpected tensor 'model.layers.2.attention.bogus.weight' in .*{shard}"
    ):
        from_hf(hf, progress=False)


def test_wrong_shape(tmp_path, state_dict):
    name = "model.layers.9.attention.query_key_value.weight"  # softmax layer: [(4 + 2*2) * 8, 32]
    hf = _write(tmp_path, {**state_dict, name: torch.zeros(96, 32)})
    with pytest.raises(
        CheckpointError,
        match=rf"'{re.escape(name)}' in .*{_shard_of(hf, name)}: shape \[96, 32\], expected \[64, 32\]",
    ):
        from_hf(hf, progress=False)


def test_wrong_dtype(tmp_path, state_dict):
    name = "model.norm.weight"
    hf = _write(tmp_path, {**state_dict, name: torch.ones(32, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' in .*{_shard_of(hf, name)}: dtype I32"):
        from_hf(hf, progress=False)


def test_expert_bias_must_be_fp32(tmp_path, state_dict):
    name = next(key for key in state_dict if key.endswith("mlp.gate.expert_bias"))
    hf = _write(tmp_path, {**state_dict, name: state_dict[name].to(torch.bfloat16)})
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' in .*: dtype BF16, expected F32"):
        from_hf(hf, progress=False)


def test_truncated_safetensors(tmp_path, state_dict):
    hf = _write(tmp_path, state_dict)
    shard = hf / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: cannot read safetensors file"):
        from_hf(hf, progress=False)


def test_corrupt_safetensors_header(tmp_path, state_dict):
    hf = _write(tmp_path, state_dict, num_shards=1)
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        from_hf(hf, progress=False)


def test_index_names_a_missing_shard(tmp_path, state_dict):
    hf = _write(tmp_path, state_dict)
    (hf / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lists model-00001-of-00002\.safetensors, which does not exist"):
        from_hf(hf, progress=False)


def test_missing_config_json(tmp_path, state_dict):
    hf = _write(tmp_path, state_dict)
    (hf / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        from_hf(hf, progress=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "bailing_moe_v2", "model_type must be 'bailing_moe_linear', got 'bailing_moe_v2'"),
        ("score_function", "softmax", "score_function='softmax' is not supported"),
        ("tie_word_embeddings", True, "tie_word_embeddings=True is not supported"),
        ("linear_silu", True, "linear_silu=True is not supported"),
        ("use_bias", True, "use_bias=True is not supported"),
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
        ("hidden_size", "32", "field 'hidden_size' must be int, got '32'"),
        ("num_experts", None, "field 'num_experts' must be int, got None"),
    ],
)
def test_unsupported_config_values(tmp_path, state_dict, field, value, message):
    hf = _write(tmp_path, state_dict, tiny_hf_config(**{field: value}))
    with pytest.raises(HFConfigError, match=re.escape(f"{hf / 'config.json'}: {message}")):
        from_hf(hf, progress=False)


def test_missing_required_config_field(tmp_path, state_dict):
    config = tiny_hf_config()
    del config["n_group"]
    hf = _write(tmp_path, state_dict, config)
    with pytest.raises(HFConfigError, match="required field 'n_group' is missing"):
        from_hf(hf, progress=False)


def test_non_persistent_names_and_unused_mtp_tensors_are_skipped(tmp_path, state_dict, caplog):
    extra = {
        "model.layers.0.attention.slope": torch.zeros(4),
        "model.rotary_emb.inv_freq": torch.zeros(2),
        "model.mtp.layers.0.enorm.weight": torch.ones(32),
    }
    with caplog.at_level(logging.WARNING, logger="ring_jax.convert"):
        model = from_hf(_write(tmp_path, {**state_dict, **extra}), progress=False)
    assert model.config.num_nextn_predict_layers == 0
    assert "skipping 1 tensor(s) of MTP blocks the config does not use (e.g. 'model.mtp.layers.0.enorm.weight')" in (
        caplog.text
    )
    assert "slope" not in caplog.text and "inv_freq" not in caplog.text


def test_mtp_blocks_beyond_the_config_are_skipped_and_missing_ones_named(tmp_path, caplog):
    """A checkpoint holding 2 MTP blocks (model.layers.10/11) under config.json values asking for 0, 1 or 3."""
    state = random_state_dict(tiny_hf_config(num_nextn_predict_layers=2), seed=9)
    hf = _write(tmp_path, state, tiny_hf_config())  # config.json: num_nextn_predict_layers=0
    with caplog.at_level(logging.WARNING, logger="ring_jax.convert"):
        assert len(from_hf(hf, progress=False).mtp_layers) == 0
        assert re.search(
            r"skipping \d+ tensor\(s\) of MTP blocks the config does not use \(e\.g\. 'model\.layers\.10\.", caplog.text
        )
        assert "num_nextn_predict_layers=0, the checkpoint holds 2 MTP blocks" in caplog.text
        caplog.clear()
        assert len(from_hf(hf, overrides={"num_nextn_predict_layers": 1}, progress=False).mtp_layers) == 1
        assert "(e.g. 'model.layers.11." in caplog.text
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.12\.enorm\.weight' .*in .*: it belongs "
                                              r"to MTP block 2, but the checkpoint holds 2 MTP blocks and the config "
                                              r"asks for num_nextn_predict_layers=3"):  # fmt: skip
        from_hf(hf, overrides={"num_nextn_predict_layers": 3}, progress=False)
    both = _write(tmp_path / "both", {**state, "model.mtp.layers.0.enorm.weight": torch.ones(32)}, tiny_hf_config())
    with pytest.raises(CheckpointError, match=r"MTP blocks stored twice: as 'model\.mtp\.layers\.0\.enorm\.weight' "
                                              r"and as 'model\.layers\.10\.\*'"):  # fmt: skip
        from_hf(both, progress=False)


def test_state_dict_errors_name_the_tensor(state_dict):
    bad = {**state_dict, "lm_head.weight": torch.zeros(61, 31)}
    with pytest.raises(
        CheckpointError, match=r"'lm_head.weight' in <state_dict>: shape \[61, 31\], expected \[61, 32\]"
    ):
        from_torch_state_dict(bad, tiny_hf_config())


def test_cli_failure_leaves_nothing_behind(tmp_path, state_dict, capsys):
    name = "model.layers.4.attention.g_proj.weight"
    hf = _write(tmp_path, {k: v for k, v in state_dict.items() if k != name})
    assert cli_main(["from-hf", "--src", str(hf), "--dst", str(tmp_path / "ckpt"), "--no-progress"]) == 1
    assert name in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_to_hf_rejects_a_directory_that_is_not_a_checkpoint(tmp_path, state_dict):
    hf = _write(tmp_path, state_dict)
    with pytest.raises(CheckpointError, match="is not a ring_jax model checkpoint"):
        checkpoint_to_hf(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
