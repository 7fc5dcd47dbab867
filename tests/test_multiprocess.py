"""Several processes, one job (CPU): `train.py` in 2 processes × 4 virtual devices trains the same losses as
1 process × 8 devices, and saves / restores its Orbax checkpoint across both processes."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from support import ChildProcess, cpu_devices_env

TIMEOUT_S = 600
TINY = [
    "--config.model.hidden_size=32", "--config.model.num_hidden_layers=3", "--config.model.layer_group_size=3",
    "--config.model.num_attention_heads=2", "--config.model.num_key_value_heads=1", "--config.model.head_dim=16",
    "--config.model.group_norm_size=2", "--config.model.intermediate_size=64",
    "--config.model.moe_intermediate_size=16", "--config.model.moe_shared_expert_intermediate_size=16",
    "--config.model.num_experts=8",
    "--config.model.num_experts_per_tok=2", "--config.model.n_group=2", "--config.model.topk_group=1",
    "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.train.log_every=1",
    "--config.train.steps=4", "--config.optim.warmup_steps=1", "--config.data.num_default_documents=2000",
    "--config.data.num_shards=2", "--config.checkpoint.every_n_steps=2", "--config.logging.progress_bar=False",
    "--config.mesh.data=4", "--config.mesh.expert=2",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, devices: int, extra: list[str], name: str) -> ChildProcess:
    env = cpu_devices_env(devices)
    log_file = workdir.parent / f"{workdir.name}-{name}.log"
    command = [sys.executable, "train.py", f"--workdir={workdir}", *TINY, *extra]
    return ChildProcess(command, log_file=log_file, timeout_s=TIMEOUT_S, env=env)


def _run(workdir: Path, *, processes: int, stop_at: int) -> None:
    """Runs train.py to step `stop_at` (train.steps stays 4: same schedule) in 1 or 2 processes, all killed when one
    fails or the time runs out."""
    extra = [f"--config.train.stop_at_step={stop_at}"]
    if processes == 1:
        launched = [_launch(workdir, 8, extra, f"to{stop_at}")]
    else:
        port = _free_port()
        launched = [
            _launch(workdir, 8 // processes, [*extra, f"--coordinator_address=localhost:{port}",
                                              f"--num_processes={processes}", f"--process_id={index}"],
                    f"to{stop_at}-process{index}")
            for index in range(processes)
        ]  # fmt: skip
    try:
        for process in launched:
            output = process.finish()
            assert process.returncode == 0, output[-5000:]
    finally:
        for process in launched:
            process.kill()


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


@pytest.mark.slow
def test_two_processes_train_like_one_and_restore_across_them(tmp_path):
    _run(tmp_path / "one", processes=1, stop_at=4)
    _run(tmp_path / "two", processes=2, stop_at=2)  # saves step 2 from both processes
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2"]
    _run(tmp_path / "two", processes=2, stop_at=4)  # restores step 2 across both processes
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
