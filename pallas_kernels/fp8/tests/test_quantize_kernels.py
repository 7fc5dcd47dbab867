"""The Triton quantisation kernels (pallas_triton_quantize.py, interpret mode on CPU) against the XLA quantisers of
reference.py, value for value and scale for scale: rows, columns (x^T), both from one pass, and tiles side by side
(the grouped weight gradient's operands), on odd shapes with edge tiles, all-zero tiles, both formats and
power-of-two scales."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import pallas_triton_quantize as kernels
from pallas_kernels.fp8 import reference
from pallas_kernels.fp8.tests import fp8_testing as ref64

FORMATS = ("float8_e4m3fn", "float8_e5m2")


@pytest.fixture
def seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def _inputs(seed: int, shape: tuple[int, int], dtype) -> jnp.ndarray:
    x = ref64.random_matrix(np.random.default_rng(seed), shape)
    # All-zero tiles quantise to zeros with a finite scale: rows 0-2 give all-zero row tiles, columns 0-2
    # all-zero column tiles (every 128-row block of those columns).
    x[:3, :] = 0.0
    x[:, :3] = 0.0
    return jnp.asarray(x, dtype)


def _assert_same(got: reference.QTensor, want: reference.QTensor, seed: int) -> None:
    assert got.values.shape == want.values.shape and got.values.dtype == want.values.dtype
    assert got.scales.shape == want.scales.shape and got.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales), err_msg=f"seed={seed}")
    np.testing.assert_array_equal(
        np.asarray(got.values, np.float32), np.asarray(want.values, np.float32), err_msg=f"seed={seed}"
    )


@pytest.mark.parametrize(
    ("fmt", "power_of_two", "dtype"),
    [("float8_e4m3fn", False, jnp.bfloat16), ("float8_e5m2", True, jnp.float32)],
)
def test_row_and_column_quantisers_match_xla(fmt, power_of_two, dtype, seed):
    x = _inputs(seed, (200, 136), dtype)  # 200 rows: a partial 128-row block; 136 columns: a partial tile
    fmt = jnp.dtype(fmt)
    got = kernels.quantize_rows(x, fmt, power_of_two, interpret=True)
    _assert_same(got, reference.quantize_rows(x, fmt, power_of_two), seed)
    got = kernels.quantize_columns(x, fmt, power_of_two, interpret=True)
    _assert_same(got, reference.quantize_columns(x, fmt, power_of_two), seed)
    rows, columns = kernels.quantize_rows_and_columns(x, fmt, power_of_two, interpret=True)
    _assert_same(rows, reference.quantize_rows(x, fmt, power_of_two), seed)
    _assert_same(columns, reference.quantize_columns(x, fmt, power_of_two), seed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiles_side_by_side_match_xla(fmt, seed):
    # Empty groups, a block shared by three groups, a group ending inside a block, rows past the groups.
    sizes = jnp.asarray([0, 100, 3, 129, 0, 40], jnp.int32)
    x = _inputs(seed, (300, 72), jnp.bfloat16)
    tiles = reference.group_tiles(sizes, x.shape[0], 128)
    fmt = jnp.dtype(fmt)
    got = kernels.quantize_tiles_side_by_side(x, tiles, fmt, False, interpret=True)
    _assert_same(got, reference.quantize_tiles_side_by_side(x, tiles, fmt, False), seed)
