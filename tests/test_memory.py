"""python -m ring_jax.memory: per-device bytes follow the parameter tree and the mesh's sharding rules."""

from __future__ import annotations

from support import tiny_config

from ring_jax.config import ModelConfig
from ring_jax.configs import ring_flash_linear_2, ring_mini_linear_2
from ring_jax.memory import ACCELERATORS, USABLE_FRACTION, device_memory, mesh_of, table
from ring_jax.params import count_parameters


def test_weights_split_over_the_mesh_as_the_sharding_rules_say():
    config = tiny_config()  # hidden 32, 8 experts: every weight divides by 2 along its sharded dimension
    total = count_parameters(config)["total"]
    one = device_memory(config, mesh_of({}), seq_len=16, loss_chunk_size=8)
    assert one.weights == 4 * total and one.gradients == one.weights and one.adam == 2 * one.weights
    fsdp = device_memory(config, mesh_of({"fsdp": 2}), seq_len=16, loss_chunk_size=8)
    expert = device_memory(config, mesh_of({"expert": 2}), seq_len=16, loss_chunk_size=8)
    # fsdp halves every weight with a hidden dimension; norms and expert biases stay whole.
    assert one.weights / 2 < fsdp.weights < 0.55 * one.weights
    # expert halves only the routed experts.
    assert fsdp.weights < expert.weights < one.weights
    assert one.activations_per_row["full"] < one.activations_per_row["none"]
    assert one.total(2, "none") - one.total(1, "none") == one.activations_per_row["none"]
    assert one.loss == 2 * 8 * config.vocab_size * 4


def test_released_models_fit_where_their_state_fits():
    rows = {(row["model"], row["devices"]): row for row in table(
        {"mini": ring_mini_linear_2.get_config(), "flash": ring_flash_linear_2.get_config()}, [8, 32])}  # fmt: skip
    mini, flash = rows["mini", 8], rows["flash", 8]
    mini_parameters = count_parameters(ModelConfig.from_config(ring_mini_linear_2.get_config().model))["total"]
    assert 4 * mini_parameters / 8 <= mini["weights"] < 1.001 * 4 * mini_parameters / 8  # norms stay whole
    # 16 bytes per parameter (fp32 weights, gradients, two moments) split 8 ways: Ring-mini fits 8 x H100,
    # Ring-flash (104 B parameters: 208 GB per device) fits nothing with 8 devices but 32 x H200.
    assert mini["rows_that_fit"]["H100 80GB"]["full"] >= 1 and mini["rows_that_fit"]["H200 141GB"]["none"] >= 1
    assert all(fit == {"none": 0, "full": 0} for fit in flash["rows_that_fit"].values())
    assert rows["flash", 32]["rows_that_fit"]["H200 141GB"]["full"] >= 1
    for row in rows.values():
        for accelerator, fits in row["rows_that_fit"].items():
            for remat, count in fits.items():
                needed = row["state"] + row["loss"] + max(count, 1) * row["activations_per_row"][remat]
                assert (needed <= ACCELERATORS[accelerator] * USABLE_FRACTION) == (count > 0)
