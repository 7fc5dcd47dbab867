"""Per-shape settings of the Triton lightning kernels: a measured table first, a first-principles model otherwise.

Forward. Each program carries one [head_dim, block_v] block of the fp32 state through its chunks in sequence,
so a forward is `waves x chunk steps`: programs = (head_dim / block_v) * heads * batch * splits, a wave is what
the SMs hold at once (`SMS` x the kernel's resident programs per SM), and every program walks
ceil(seq / (chunk * splits)) chunks. Narrow value blocks and sequence pieces make more programs (fill the SMs when
batch * heads is small) but cost work: each block recomputes q kᵀ, and pieces add a state pass reading k and v
again. No schedule beats the bytes: the model takes the larger of that time and the bytes moved at
`HBM_BYTES_PER_US`. `forward_tuning` evaluates the model over `FORWARD_CONFIGS` and the allowed splits and keeps
the fastest, unless `MEASURED_FORWARD` holds the shape (benchmarks/lightning.py prints that table, measured on the
GPU).

Decode. A step reads and writes the fp32 state once: programs = (head_dim / block_v) * heads * batch; few
programs leave the step latency-bound (split the state finely), many make it bandwidth-bound (wide blocks, long
contiguous rows). `MEASURED_DECODE` overrides per (batch * heads, head_dim).
"""

from __future__ import annotations

import dataclasses
import math

SMS = 132  # H100 / H200 streaming multiprocessors
HBM_BYTES_PER_US = 4.3e6  # H200 copy bandwidth (4.8 TB/s peak)
MAX_SPLITS = 16  # a forward piece folds in every earlier piece's state: cost grows with splits²
MIN_PIECE_CHUNKS = 8  # shorter pieces spend more on the state pass and prologue than they gain


@dataclasses.dataclass(frozen=True)
class ForwardTuning:
    chunk: int
    block_v: int
    splits: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """A forward kernel configuration and its cost model parameters (head_dim 128, bf16, H100-class GPU)."""

    chunk: int
    block_v: int
    num_warps: int
    num_stages: int
    programs_per_sm: int  # resident programs per SM, from ptxas registers / shared memory of the compiled kernel
    step_us: float  # µs per chunk step of one program with the SM fully loaded (model; replace with measurements)


# Forward kernels worth sweeping. programs_per_sm from their sm_90 builds (bf16, head_dim 128; registers x threads
# and shared memory per SM): c64/v32/w4: 174-253 registers, 76 KB (2 stages) or 112 KB (3 stages) -> 2; the 8-warp
# ones 185-255 registers -> 1 (v128 spills a few bytes, 216 with documents; c128 104 with documents). step_us:
# measured by benchmarks/lightning.py (median over the swept shapes of the single-pass runs; BENCHMARKS.md has the
# run). The first config is the one fp32 inputs get.
FORWARD_CONFIGS = (
    ForwardConfig(chunk=64, block_v=32, num_warps=4, num_stages=3, programs_per_sm=2, step_us=2.00),
    ForwardConfig(chunk=64, block_v=32, num_warps=4, num_stages=2, programs_per_sm=2, step_us=2.63),
    ForwardConfig(chunk=64, block_v=64, num_warps=8, num_stages=2, programs_per_sm=1, step_us=3.46),
    ForwardConfig(chunk=64, block_v=128, num_warps=8, num_stages=2, programs_per_sm=1, step_us=4.82),
    ForwardConfig(chunk=128, block_v=32, num_warps=8, num_stages=2, programs_per_sm=1, step_us=3.78),
)
STATE_STEP_FRACTION = 0.35  # a state-pass chunk step (one matmul) relative to a forward step, same config

# (batch * heads, seq rounded up to a power of two, head_dim) -> measured fastest forward (see module docstring).
# Measured by benchmarks/lightning.py (the fastest swept config per shape; BENCHMARKS.md has the run).
MEASURED_FORWARD: dict[tuple[int, int, int], ForwardTuning] = {
    (64, 8192, 128): ForwardTuning(chunk=64, block_v=32, splits=1, num_warps=4, num_stages=3),  # B4 T8192 H16
    (16, 32768, 128): ForwardTuning(chunk=64, block_v=32, splits=4, num_warps=4, num_stages=3),  # B1 T32768 H16
    (64, 16384, 128): ForwardTuning(chunk=64, block_v=32, splits=1, num_warps=4, num_stages=3),  # B2 T16384 H32
    (256, 4096, 128): ForwardTuning(chunk=64, block_v=32, splits=1, num_warps=4, num_stages=3),  # B8 T4096 H32
    (32, 16384, 128): ForwardTuning(chunk=64, block_v=32, splits=4, num_warps=4, num_stages=3),  # B2 T10000 H16
}


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    block_v: int
    num_warps: int


# (batch * heads, head_dim) -> measured fastest decode step.
MEASURED_DECODE: dict[tuple[int, int], DecodeTuning] = {  # benchmarks/lightning.py, as MEASURED_FORWARD
    (16, 128): DecodeTuning(block_v=32, num_warps=4),  # B1 H16
    (1024, 128): DecodeTuning(block_v=128, num_warps=8),  # B64 H16
    (4096, 128): DecodeTuning(block_v=128, num_warps=8),  # B256 H16
}
DECODE_CONFIGS = (DecodeTuning(16, 4), DecodeTuning(32, 4), DecodeTuning(64, 4), DecodeTuning(128, 8))


def forward_key(batch: int, seq: int, heads: int, head_dim: int) -> tuple[int, int, int]:
    return batch * heads, 1 << max(0, seq - 1).bit_length(), head_dim


def split_options(seq: int, chunk: int) -> tuple[int, ...]:
    """Powers of two up to MAX_SPLITS that leave pieces of at least MIN_PIECE_CHUNKS chunks."""
    chunks = -(-seq // chunk)
    return tuple(s for s in (1, 2, 4, 8, 16) if s <= MAX_SPLITS and (s == 1 or chunks >= s * MIN_PIECE_CHUNKS))


def serial_steps(
    cfg: ForwardConfig,
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    splits: int,
    pieces: int | None = None,
    sms: int = SMS,
) -> int:
    """Waves x chunk steps per program of a forward kernel over `pieces` of the `splits` pieces (default all)."""
    per_piece = math.ceil(math.ceil(seq / cfg.chunk) / splits)
    programs = (head_dim // min(cfg.block_v, head_dim)) * heads * batch * (splits if pieces is None else pieces)
    return math.ceil(programs / (sms * cfg.programs_per_sm)) * per_piece


def modelled_forward_us(
    cfg: ForwardConfig, batch: int, seq: int, heads: int, head_dim: int, splits: int, sms: int = SMS
) -> float:
    """Model time of a bf16 forward (see module docstring): waves x chunk steps x µs per step, plus the state pass,
    but no less than its bytes (q, k, v, o; k, v again for the state pass) at HBM_BYTES_PER_US."""
    time = serial_steps(cfg, batch, seq, heads, head_dim, splits, sms=sms) * cfg.step_us
    elements = batch * seq * heads * head_dim
    moved = 8 * elements
    if splits > 1:
        state_steps = serial_steps(cfg, batch, seq, heads, head_dim, splits, pieces=splits - 1, sms=sms)
        time += state_steps * cfg.step_us * STATE_STEP_FRACTION
        moved += 4 * elements * (splits - 1) / splits
    return max(time, moved / HBM_BYTES_PER_US)


def modelled_tuning(
    batch: int, seq: int, heads: int, head_dim: int, *, chunk: int | None = None, itemsize: int = 2
) -> ForwardTuning:
    """The cost model's fastest (config, splits) over FORWARD_CONFIGS (those at `chunk` when given).

    4-byte inputs get the first config only: exact fp32 matmuls compile to long FMA loops that spill, so the
    smallest blocks (minutes of ptxas for the wider ones)."""
    configs = [c for c in FORWARD_CONFIGS if chunk is None or c.chunk == chunk]
    if itemsize > 2:
        configs = configs[:1]
    if not configs:  # a chunk no config was built for: the default kernel shape at that chunk, single pass
        first = FORWARD_CONFIGS[0]
        return ForwardTuning(chunk, first.block_v, 1, first.num_warps, first.num_stages)
    _, _, splits, cfg = min(
        (modelled_forward_us(c, batch, seq, heads, head_dim, s), i, s, c)
        for i, c in enumerate(configs)
        for s in split_options(seq, c.chunk)
    )
    return ForwardTuning(cfg.chunk, cfg.block_v, splits, cfg.num_warps, cfg.num_stages)


def forward_tuning(
    batch: int, seq: int, heads: int, head_dim: int, *, chunk: int | None = None, itemsize: int = 2
) -> ForwardTuning:
    """The measured table's entry for the shape (2-byte inputs; if its chunk is `chunk` or none is asked), else
    the model's."""
    measured = MEASURED_FORWARD.get(forward_key(batch, seq, heads, head_dim))
    if measured is not None and itemsize == 2 and chunk in (None, measured.chunk):
        return measured
    return modelled_tuning(batch, seq, heads, head_dim, chunk=chunk, itemsize=itemsize)


def decode_tuning(batch: int, heads: int, head_dim: int) -> DecodeTuning:
    """Measured entry, else the widest block that still makes 4 programs per SM (large batches: long contiguous
    rows, few programs), and below that the narrowest (small, latency-bound batches: many small programs)."""
    measured = MEASURED_DECODE.get((batch * heads, head_dim))
    if measured is not None:
        return measured
    for cfg in reversed(DECODE_CONFIGS):  # widest first
        block_v = min(cfg.block_v, head_dim)
        if (head_dim // block_v) * heads * batch >= 4 * SMS:
            return DecodeTuning(block_v, cfg.num_warps)
    first = DECODE_CONFIGS[0]
    return DecodeTuning(min(first.block_v, head_dim), first.num_warps)
