"""Per-shape kernel settings: piece layout, the forward cost model, measured-table precedence, decode blocks."""

import pytest

from pallas_kernels.lightning import tuning
from pallas_kernels.lightning.pallas_triton import piece_layout

CONFIG_FIELDS = {(c.chunk, c.block_v, c.num_warps, c.num_stages) for c in tuning.FORWARD_CONFIGS}


@pytest.mark.parametrize(
    "seq,chunk,splits,expected",
    [
        (45, 8, 1, (48, 1)),  # one piece covering the padded tail
        (45, 8, 3, (16, 3)),  # 6 chunks: 2 per piece
        (37, 8, 4, (16, 3)),  # 5 chunks: 2 per piece, only 3 pieces needed
        (32768, 64, 4, (8192, 4)),
        (10000, 64, 4, (2560, 4)),  # last piece: 2320 tokens, a partial chunk
        (64, 64, 8, (64, 1)),
    ],
)
def test_piece_layout(seq, chunk, splits, expected):
    piece_len, pieces = piece_layout(seq, chunk, splits)
    assert (piece_len, pieces) == expected
    assert piece_len % chunk == 0 and (pieces - 1) * piece_len < seq <= pieces * piece_len


@pytest.mark.parametrize(
    "shape", [(4, 8192, 16, 128), (1, 32768, 16, 128), (2, 16384, 32, 128), (8, 4096, 32, 128), (2, 10000, 16, 128)]
)
def test_forward_tuning_picks_a_built_config(shape, monkeypatch):
    monkeypatch.setattr(tuning, "MEASURED_FORWARD", {})
    picked = tuning.forward_tuning(*shape)
    assert (picked.chunk, picked.block_v, picked.num_warps, picked.num_stages) in CONFIG_FIELDS
    assert picked.splits in tuning.split_options(shape[1], picked.chunk)


def test_forward_model_fills_the_gpu_and_splits_only_when_needed(monkeypatch):
    monkeypatch.setattr(tuning, "MEASURED_FORWARD", {})
    few = tuning.forward_tuning(1, 32768, 16, 128)  # 16 (batch, head) pairs: the sequence must be split
    programs = (128 // few.block_v) * 16 * few.splits
    assert few.splits > 1 and programs >= tuning.SMS // 2
    many = tuning.forward_tuning(16, 4096, 64, 128)  # 1024 pairs: already many waves
    assert many.splits == 1
    short = tuning.forward_tuning(1, 256, 1, 128)  # 4 chunks: too short to split
    assert short.splits == 1


def test_model_charges_the_state_pass():
    cfg = tuning.FORWARD_CONFIGS[0]
    single = tuning.modelled_forward_us(cfg, 1, 8192, 512, 128, 1)  # many waves either way
    split = tuning.modelled_forward_us(cfg, 1, 8192, 512, 128, 2)
    assert split > single


def test_measured_table_wins_and_chunk_restricts(monkeypatch):
    entry = tuning.ForwardTuning(chunk=64, block_v=64, splits=2, num_warps=8, num_stages=2)
    monkeypatch.setattr(tuning, "MEASURED_FORWARD", {tuning.forward_key(4, 8000, 16, 128): entry})
    assert tuning.forward_key(4, 8000, 16, 128) == (64, 8192, 128)
    assert tuning.forward_tuning(4, 8000, 16, 128) == entry
    assert tuning.forward_tuning(4, 8000, 16, 128, chunk=128).chunk == 128  # the table's chunk differs: model
    odd = tuning.forward_tuning(4, 8000, 16, 128, chunk=8)  # no built config: the default kernel at that chunk
    assert (odd.chunk, odd.splits) == (8, 1)


def test_decode_tuning(monkeypatch):
    monkeypatch.setattr(tuning, "MEASURED_DECODE", {})
    small = tuning.decode_tuning(1, 16, 128)
    large = tuning.decode_tuning(256, 16, 128)
    assert small.block_v < large.block_v
    assert (128 // small.block_v) * 16 >= 64  # batch 1: more programs than heads
    entry = tuning.DecodeTuning(block_v=64, num_warps=4)
    monkeypatch.setattr(tuning, "MEASURED_DECODE", {(64 * 16, 128): entry})
    assert tuning.decode_tuning(64, 16, 128) == entry
    assert tuning.decode_tuning(4, 8, 16).block_v <= 16  # never wider than head_dim


def test_fp32_inputs_get_the_smallest_blocks(monkeypatch):
    entry = tuning.ForwardTuning(chunk=64, block_v=128, splits=1, num_warps=8, num_stages=2)
    monkeypatch.setattr(tuning, "MEASURED_FORWARD", {tuning.forward_key(8, 4096, 32, 128): entry})
    assert tuning.forward_tuning(8, 4096, 32, 128) == entry
    wide = tuning.forward_tuning(8, 4096, 32, 128, itemsize=4)  # the bf16 table does not apply
    first = tuning.FORWARD_CONFIGS[0]
    assert (wide.chunk, wide.block_v, wide.num_warps, wide.num_stages) == (
        first.chunk,
        first.block_v,
        first.num_warps,
        first.num_stages,
    )
