"""Grouped-matmul config search: candidate generation, the tuned-config file (round trip, card-kind check, atomic
writes), doing nothing without a GPU; on a GPU, a real search whose saved configs load back."""

import dataclasses
import itertools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gmm import grouped_matmul
from pallas_kernels.gmm.tuning import (
    TUNING_FILE_FORMAT,
    candidate_configs,
    load_tuned_configs,
    read_tuning_file,
    tokamax_available,
    tune_grouped_matmuls,
    write_tuning_file,
)

GRID = {"block_m": (64, 128), "block_k": (64, 128), "num_stages": (2, 4), "persistent": (False, True),
        "grid_tile_width": (1, 8)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The fields of tokamax's GPU ragged-dot config that the search varies, plus one it must leave alone."""

    block_m: int
    block_k: int
    num_stages: int
    persistent: bool
    grid_tile_width: int
    split_k: int = 3


def test_candidates_are_the_heuristic_and_every_knob_combination():
    heuristic = KernelConfig(block_m=64, block_k=256, num_stages=3, persistent=False, grid_tile_width=1)
    candidates = candidate_configs(heuristic)
    assert heuristic in candidates and len(candidates) == 1 + 2**5
    varied = candidates - {heuristic}
    assert {tuple(getattr(c, k) for k in GRID) for c in varied} == set(itertools.product(*GRID.values()))
    assert {c.split_k for c in candidates} == {3}
    inside = KernelConfig(block_m=128, block_k=64, num_stages=4, persistent=True, grid_tile_width=8)
    assert len(candidate_configs(inside)) == 2**5  # a heuristic inside the grid is not counted twice


def test_tuning_file_round_trip_and_card_kind_check(tmp_path, caplog):
    path = str(tmp_path / "kernel_tuning.json")
    assert read_tuning_file(path, "NVIDIA H200") is None  # no file yet
    write_tuning_file(path, "NVIDIA H200", '{"tokamax": "payload 1"}')
    assert read_tuning_file(path, "NVIDIA H200") == '{"tokamax": "payload 1"}'
    assert read_tuning_file(path, "NVIDIA H100 80GB HBM3") is None  # tuned on another card kind
    write_tuning_file(path, "NVIDIA H200", "payload 2")  # replaces the previous file
    assert read_tuning_file(path, "NVIDIA H200") == "payload 2"
    assert os.listdir(tmp_path) == ["kernel_tuning.json"]

    with pytest.raises(TypeError):  # a write that fails half-way keeps the previous file and leaves nothing behind
        write_tuning_file(path, "NVIDIA H200", object())
    assert read_tuning_file(path, "NVIDIA H200") == "payload 2" and os.listdir(tmp_path) == ["kernel_tuning.json"]

    file = tmp_path / "kernel_tuning.json"
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.gmm.tuning"):
        file.write_text(file.read_text()[:40])  # what a non-atomic writer leaves when it is killed
        assert read_tuning_file(path, "NVIDIA H200") is None
        assert f"{path}: cannot read tuned kernel configs" in caplog.text
        file.write_text(json.dumps({"device_kind": "NVIDIA H200", "data": []}))  # not this file format
        assert read_tuning_file(path, "NVIDIA H200") is None
        assert f"{path}: not a {TUNING_FILE_FORMAT} file" in caplog.text


def test_without_a_gpu_tuning_does_nothing(tmp_path):
    assert jax.default_backend() != "gpu" and not tokamax_available()
    path = str(tmp_path / "kernel_tuning.json")
    lowered = jax.jit(lambda a: grouped_matmul(a, a[None], jnp.array([4]))).lower(jnp.ones((4, 4)))
    assert tune_grouped_matmuls(lowered, path) == [] and not os.path.exists(path)
    write_tuning_file(path, jax.devices()[0].device_kind, "{}")
    assert load_tuned_configs(path) is None  # tokamax configs mean nothing off the GPU


@pytest.mark.gpu
def test_search_saves_configs_that_load_back(tmp_path, rng):
    """A real search over the forward and backward kernels of a small grouped matmul: the best config is not slower
    than the heuristic, the saved file loads back the same configs, and the tuned kernels still compute the
    product."""
    assert tokamax_available(), "the gpu extra (tokamax) is not installed"
    path = str(tmp_path / "kernel_tuning.json")
    sizes = np.bincount(rng.integers(0, 8, 1024), minlength=8)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(1024, 256)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(8, 256, 512)) * 0.05, jnp.bfloat16)

    def loss(lhs, rhs):
        out = grouped_matmul(lhs, rhs, group_sizes, implementation="tokamax", preferred_element_type=jnp.float32)
        return jnp.sum(out**2), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    searched = tune_grouped_matmuls(step.lower(lhs, rhs), path)
    assert len(searched) >= 2 and all(op.searched for op in searched)  # forward + at least one backward kernel
    for op in searched:  # the heuristic is a candidate (its time is NaN only if it failed); 5 % for timing noise
        assert np.isfinite(op.best_ms) and not op.best_ms > 1.05 * op.heuristic_ms, op
    loaded = load_tuned_configs(path)
    assert loaded is not None and all(not op.searched for op in loaded)
    assert sorted((op.name, op.shapes, op.best_config) for op in loaded) == sorted(
        (op.name, op.shapes, op.best_config) for op in searched
    )
    (_, out), _ = step(lhs, rhs)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    lhs64, rhs64 = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    expected = np.concatenate([lhs64[starts[g] : starts[g + 1]] @ rhs64[g] for g in range(8)])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-2, atol=2e-2)
