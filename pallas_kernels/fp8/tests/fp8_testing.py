"""The blockwise FP8 recipe in float64 NumPy, tile by tile with explicit loops (written from the recipe's text, not
from reference.py), plus random inputs for the FP8 tests."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from pallas_kernels.testing import relative_error  # noqa: F401 - re-exported for the FP8 tests

TILE = 128
TINY = np.finfo(np.float32).tiny


def fp8_max(fmt: str) -> float:
    return float(ml_dtypes.finfo(getattr(ml_dtypes, fmt)).max)


def scales(amax: np.ndarray, fmt: str, power_of_two: bool) -> np.ndarray:
    """amax x fp32(1 / format max) in fp32 (at least the smallest normal), optionally rounded up to 2^e."""
    s = np.maximum(np.float32(amax) * np.float32(1.0 / fp8_max(fmt)), np.float32(TINY))
    if power_of_two:
        mantissa, exponent = np.frexp(s.astype(np.float64))
        s = np.where(mantissa == 0.5, s, np.ldexp(1.0, exponent)).astype(np.float32)
    return s


def quantize(x: np.ndarray, s: np.ndarray, fmt: str) -> np.ndarray:
    """x (fp32) x fp32(1 / s) rounded to fp32 (the product of two fp32 numbers is exact in float64), clipped,
    rounded to nearest even in fmt; back as float64."""
    inverse = (np.float32(1.0) / np.asarray(s, np.float32)).astype(np.float64)
    product = (np.asarray(x, np.float32).astype(np.float64) * inverse).astype(np.float32)
    return np.clip(product, -fp8_max(fmt), fp8_max(fmt)).astype(getattr(ml_dtypes, fmt)).astype(np.float64)


def lines_quantize(x: np.ndarray, axis: int, fmt: str, power_of_two: bool) -> tuple[np.ndarray, np.ndarray]:
    """A tile whose lines along `axis` each get one scale -> (FP8 values as float64, per-element scales)."""
    amax = np.max(np.abs(np.asarray(x, np.float64)), axis=axis, keepdims=True, initial=0.0)
    s = scales(amax, fmt, power_of_two)
    return quantize(x, s.astype(np.float64), fmt), np.broadcast_to(s, x.shape)


def rows_quantized(x: np.ndarray, fmt: str, power_of_two: bool) -> tuple[np.ndarray, np.ndarray]:
    """1 x 128 tiles along the last axis of x [m, c] -> (FP8 values [m, c], per-element scales [m, c])."""
    q, s = np.zeros(x.shape), np.zeros(x.shape, np.float32)
    for j in range(0, x.shape[1], TILE):
        q[:, j : j + TILE], s[:, j : j + TILE] = lines_quantize(x[:, j : j + TILE], 1, fmt, power_of_two)
    return q, s


def blocks_quantized(w: np.ndarray, fmt: str, power_of_two: bool) -> tuple[np.ndarray, np.ndarray]:
    """128 x 128 blocks of w [k, n] -> (FP8 values [k, n], per-element scales [k, n])."""
    q, s = np.zeros(w.shape), np.zeros(w.shape, np.float32)
    for i in range(0, w.shape[0], TILE):
        for j in range(0, w.shape[1], TILE):
            block = (slice(i, i + TILE), slice(j, j + TILE))
            q[block], s[block] = lines_quantize(w[block], None, fmt, power_of_two)
    return q, s


def column_tiles(group_bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row ranges of the 128 x 1 tiles: aligned 128-row blocks cut at the given group boundaries."""
    tiles = []
    for start, end in group_bounds:
        row = start
        while row < end:
            stop = min(end, (row // TILE + 1) * TILE)
            tiles.append((row, stop))
            row = stop
    return tiles


def columns_quantized(x: np.ndarray, tiles: list[tuple[int, int]], fmt: str, power_of_two: bool):
    """128 x 1 tiles (row ranges `tiles`, one scale per column of each) -> (FP8 values, per-element scales);
    rows in no tile are 0 in both."""
    q, s = np.zeros(x.shape), np.zeros(x.shape, np.float32)
    for start, stop in tiles:
        q[start:stop], s[start:stop] = lines_quantize(x[start:stop], 0, fmt, power_of_two)
    return q, s


def dequantized(quantized: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    q, s = quantized
    return q * s.astype(np.float64)


def matmul_and_grads(x, w, dy, fwd: str, grad: str, power_of_two: bool):
    """The recipe's y = x @ w, dx = dy @ w^T, dw = x^T @ dy in float64."""
    w_dq = dequantized(blocks_quantized(w, fwd, power_of_two))
    y = dequantized(rows_quantized(x, fwd, power_of_two)) @ w_dq
    dx = dequantized(rows_quantized(dy, grad, power_of_two)) @ w_dq.T
    tiles = column_tiles([(0, x.shape[0])])
    x_cols = dequantized(columns_quantized(x, tiles, fwd, power_of_two))
    dw = x_cols.T @ dequantized(columns_quantized(dy, tiles, grad, power_of_two))
    return y, dx, dw


def group_bounds(group_sizes) -> list[tuple[int, int]]:
    ends = np.cumsum(group_sizes)
    return [(int(e - s), int(e)) for s, e in zip(group_sizes, ends, strict=True)]


def grouped_matmul_and_grads(lhs, rhs, group_sizes, dy, fwd: str, grad: str, power_of_two: bool):
    """The recipe's grouped forward, dlhs and drhs in float64; rows past sum(group_sizes) give zeros."""
    bounds = group_bounds(group_sizes)
    x_dq = dequantized(rows_quantized(lhs, fwd, power_of_two))
    dy_dq = dequantized(rows_quantized(dy, grad, power_of_two))
    tiles = column_tiles(bounds)
    x_cols = dequantized(columns_quantized(lhs, tiles, fwd, power_of_two))
    dy_cols = dequantized(columns_quantized(dy, tiles, grad, power_of_two))
    out, dlhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros(lhs.shape)
    drhs = np.zeros(rhs.shape)
    for g, (start, end) in enumerate(bounds):
        w_dq = dequantized(blocks_quantized(rhs[g], fwd, power_of_two))
        out[start:end] = x_dq[start:end] @ w_dq
        dlhs[start:end] = dy_dq[start:end] @ w_dq.T
        drhs[g] = x_cols[start:end].T @ dy_cols[start:end]
    return out, dlhs, drhs


def random_matrix(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian entries with a per-row magnitude spread over 4 decades (so tiles get different scales)."""
    magnitude = 10.0 ** rng.uniform(-2, 2, size=(*shape[:-1], 1))
    return (rng.standard_normal(shape) * magnitude).astype(np.float32)
