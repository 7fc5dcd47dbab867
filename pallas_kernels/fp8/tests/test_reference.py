"""The emulated recipe ("reference") against the float64 NumPy recipe: exact scales and FP8 values (edge tiles of
odd shapes, zero tiles, both formats, power-of-two scales), error bounds, dense and grouped forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import Fp8Recipe, blockwise_grouped_matmul, blockwise_matmul
from pallas_kernels.fp8.recipe import TILE
from pallas_kernels.fp8.reference import (
    dequantize,
    dequantize_grouped_columns,
    group_tiles,
    line_scales,
    quantize_blocks,
    quantize_grouped_columns,
    quantize_rows,
    row_tiles,
)
from pallas_kernels.fp8.tests import fp8_testing as ref64

FORMATS = ("float8_e4m3fn", "float8_e5m2")


@pytest.fixture
def seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def _with_zero_tile(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[0, :TILE] = 0.0  # an all-zero tile must quantise to zeros with a finite scale
    return x


def _expand(scales: np.ndarray, size: int) -> np.ndarray:
    """[..., ceil(size/128)] per-tile scales -> [..., size] per element."""
    return np.repeat(scales, TILE, axis=-1)[..., :size]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("power_of_two", [False, True])
def test_row_tiles_match_float64_exactly(fmt, power_of_two, seed):
    x = _with_zero_tile(ref64.random_matrix(np.random.default_rng(seed), (5, 300)))  # tiles of 128, 128, 44
    q = quantize_rows(jnp.asarray(x), jnp.dtype(fmt), power_of_two)
    assert q.values.shape == (5, 300) and q.values.dtype == jnp.dtype(fmt)
    assert q.scales.shape == (3, 5) and q.scales.dtype == jnp.float32
    values, scales = ref64.rows_quantized(x, fmt, power_of_two)
    np.testing.assert_array_equal(_expand(np.asarray(q.scales).T, 300), scales, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(q.values, np.float64), values, err_msg=f"seed={seed}")
    assert np.all(values[0, :TILE] == 0.0) and np.all(np.isfinite(np.asarray(dequantize(q))))
    if power_of_two:
        assert np.all(np.log2(scales) == np.round(np.log2(scales)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_blocks_match_float64_exactly(fmt, seed):
    w = ref64.random_matrix(np.random.default_rng(seed), (3, 200, 136))  # edge blocks 72 rows, 8 columns
    q = quantize_blocks(jnp.asarray(w), jnp.dtype(fmt), False)
    assert q.values.shape == w.shape and q.scales.shape == (3, 2, 2)
    for e in range(3):
        values, scales = ref64.blocks_quantized(w[e], fmt, False)
        np.testing.assert_array_equal(np.asarray(q.values[e], np.float64), values, err_msg=f"seed={seed}")
        # Both GEMM layouts of the weight carry the same blocks.
        for operand, transpose in ((q.input_side(), True), (q.output_side(), False)):
            values_e = np.asarray(operand.values[e], np.float64)
            per_element = _expand(np.asarray(line_scales(operand)[e]).T, values_e.shape[1])
            if transpose:
                values_e, per_element = values_e.T, per_element.T
            np.testing.assert_array_equal(values_e, values, err_msg=f"seed={seed}")
            np.testing.assert_array_equal(per_element, scales, err_msg=f"seed={seed}")


def test_grouped_column_tiles_match_float64_exactly(seed):
    """Tiles are aligned 128-row blocks cut at group boundaries; empty groups and padding rows take no tile."""
    sizes = np.array([0, 100, 150, 0, 30], np.int32)  # boundaries at 100 and 250 cut blocks; rows 280-299 padding
    x = ref64.random_matrix(np.random.default_rng(seed), (300, 136))
    tiles = group_tiles(jnp.asarray(sizes), 300, TILE)
    q = quantize_grouped_columns(jnp.asarray(x), tiles, jnp.dtype("float8_e4m3fn"), False)
    assert q.values.shape == (136, 300)
    expected_tiles = ref64.column_tiles(ref64.group_bounds(sizes))
    assert expected_tiles == [(0, 100), (100, 128), (128, 250), (250, 256), (256, 280)]
    assert int(np.asarray(tiles.group_first_tile)[len(sizes)]) == len(expected_tiles)
    values, scales = ref64.columns_quantized(x, expected_tiles, "float8_e4m3fn", False)
    tile_of_row, in_group = (np.asarray(a) for a in row_tiles(tiles, 300, TILE))
    assert np.array_equal(in_group, np.arange(300) < 280)
    np.testing.assert_array_equal(np.asarray(q.values, np.float64).T[:280], values[:280], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(q.scales)[tile_of_row][:280], scales[:280], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(dequantize_grouped_columns(q, tiles))[280:], 0.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantisation_error_is_within_half_a_unit(fmt, seed):
    """|x - dq(x)| <= max(|x| eps / 2, scale * smallest subnormal / 2): round-to-nearest, nothing worse."""
    x = ref64.random_matrix(np.random.default_rng(seed), (64, 384))
    q = quantize_rows(jnp.asarray(x), jnp.dtype(fmt), False)
    info = jnp.finfo(jnp.dtype(fmt))
    per_element_scale = np.repeat(np.asarray(q.scales).T, TILE, axis=1)
    bound = np.maximum(np.abs(x) * float(info.eps) / 2, per_element_scale * float(info.smallest_subnormal) / 2)
    error = np.abs(np.asarray(dequantize(q), np.float64) - x)
    assert np.all(error <= bound * (1 + 1e-6)), f"seed={seed}"
    assert np.max(error / np.maximum(bound, 1e-30)) > 0.5  # the bound is tight: values really were rounded


def _vjp(fn, *args, cotangent):
    """(fn(*args), its pullback of `cotangent`), compiled once."""

    def run(args, cotangent):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cotangent)

    return jax.jit(run)(args, cotangent)


@pytest.mark.parametrize(
    "dtype, gradient_format, power_of_two",
    [(jnp.float32, "float8_e4m3fn", False), (jnp.float32, "float8_e5m2", True), (jnp.bfloat16, "float8_e4m3fn", False)],
)
def test_dense_forward_and_gradients_match_float64(dtype, gradient_format, power_of_two, seed):
    rng = np.random.default_rng(seed)
    x = np.asarray(jnp.asarray(ref64.random_matrix(rng, (200, 300)), dtype), np.float32)  # values exact in dtype
    w = ref64.random_matrix(rng, (300, 136))
    dy = np.asarray(jnp.asarray(ref64.random_matrix(rng, (200, 136)), dtype), np.float32)
    recipe = Fp8Recipe(gradient_format=gradient_format, power_of_two_scales=power_of_two)
    fn = lambda x, w: blockwise_matmul(x, w, implementation="reference", recipe=recipe)
    y, (dx, dw) = _vjp(fn, jnp.asarray(x, dtype), jnp.asarray(w), cotangent=jnp.asarray(dy, dtype))
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == jnp.float32
    expected = ref64.matmul_and_grads(x, w, dy, "float8_e4m3fn", gradient_format, power_of_two)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # fp32 summation order / bf16 output rounding
    for name, got, want in zip(("y", "dx", "dw"), (y, dx, dw), expected, strict=True):
        assert ref64.relative_error(got, want) <= tol, f"{name} seed={seed}"


def test_fp8_error_against_the_exact_product(seed):
    """The result carries FP8 rounding (so the op is not silently exact) of the expected size (~2^-5 per term)."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((128, 512)).astype(np.float32), rng.standard_normal((512, 256)).astype(np.float32)
    error = ref64.relative_error(blockwise_matmul(jnp.asarray(x), jnp.asarray(w), implementation="reference"),
                                 x.astype(np.float64) @ w)  # fmt: skip
    assert 5e-3 < error < 6e-2, f"error {error} seed={seed}"


def test_leading_dimensions_and_jit(seed):
    rng = np.random.default_rng(seed)
    x, w = ref64.random_matrix(rng, (2, 3, 160)), ref64.random_matrix(rng, (160, 40))
    out = jax.jit(lambda x, w: blockwise_matmul(x, w, implementation="reference"))(jnp.asarray(x), jnp.asarray(w))
    flat = blockwise_matmul(jnp.asarray(x.reshape(6, 160)), jnp.asarray(w), implementation="reference")
    assert out.shape == (2, 3, 40)
    assert ref64.relative_error(np.asarray(out).reshape(6, 40), flat) <= 1e-5, f"seed={seed}"  # fp32 sum order


@pytest.mark.parametrize("sizes", [[0, 100, 150, 0, 30], [256, 0, 0, 44]])
def test_grouped_forward_and_gradients_match_float64(sizes, seed):
    """Empty groups, groups across 128-row blocks, and padding rows past sum(group_sizes) (zero out and dlhs)."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, np.int32)
    lhs, rhs = ref64.random_matrix(rng, (300, 136)), ref64.random_matrix(rng, (len(sizes), 136, 72))
    dy = ref64.random_matrix(rng, (300, 72))
    recipe = Fp8Recipe(power_of_two_scales=True)
    fn = lambda lhs, rhs: blockwise_grouped_matmul(lhs, rhs, jnp.asarray(sizes), implementation="reference",
                                                   recipe=recipe)  # fmt: skip
    out, (dlhs, drhs) = _vjp(fn, jnp.asarray(lhs), jnp.asarray(rhs), cotangent=jnp.asarray(dy))
    expected = ref64.grouped_matmul_and_grads(lhs, rhs, sizes, dy, "float8_e4m3fn", "float8_e4m3fn", True)
    for name, got, want in zip(("out", "dlhs", "drhs"), (out, dlhs, drhs), expected, strict=True):
        assert ref64.relative_error(got, want) <= 1e-5, f"{name} seed={seed}"
    total = int(sizes.sum())
    assert np.all(np.asarray(out)[total:] == 0) and np.all(np.asarray(dlhs)[total:] == 0)


def test_bad_inputs_name_the_tensor():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with pytest.raises(ValueError, match="^x: last dimension"):
        blockwise_matmul(jnp.ones((4, 7)), w)
    with pytest.raises(ValueError, match="^w: expected"):
        blockwise_matmul(x, jnp.ones((2, 8, 3)))
    with pytest.raises(ValueError, match="^x: expected a 16- or 32-bit float"):
        blockwise_matmul(x.astype(jnp.int32), w)
    with pytest.raises(ValueError, match="^rhs: expected"):
        blockwise_grouped_matmul(x, jnp.ones((2, 7, 3)), jnp.array([2, 2]))
    with pytest.raises(ValueError, match="^group_sizes: expected"):
        blockwise_grouped_matmul(x, jnp.ones((2, 8, 3)), jnp.array([2.0, 2.0]))
    with pytest.raises(ValueError, match="blockwise_fp8: unknown implementation 'nope'"):
        blockwise_matmul(x, w, implementation="nope")
    with pytest.raises(ValueError, match=r"^Fp8Recipe.gradient_format"):
        Fp8Recipe(gradient_format="float16")
