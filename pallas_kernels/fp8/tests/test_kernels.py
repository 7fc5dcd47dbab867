"""Pallas FP8 kernels against the emulated recipe: forward and every gradient, dense and grouped, with activations
quantised by the Triton quantisation kernels ("pallas_triton") or in the GEMM ("pallas_triton_fused"), and the
Mosaic GPU kernels ("pallas_mosaic_gpu").

CPU CI runs the kernels in interpret mode on small shapes (odd sizes, so edge tiles and padding are exercised);
the `gpu`-marked tests compile them, compare with the emulated recipe on the GPU and read the compiled program to
make sure the native matmuls really multiply FP8 operands.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import Fp8Recipe, blockwise_grouped_matmul, blockwise_matmul
from pallas_kernels.fp8 import api as fp8_api
from pallas_kernels.fp8.pallas_triton import DEFAULT_CONFIG, DEFAULT_FUSED_CONFIG, KernelConfig, TritonBackend
from pallas_kernels.fp8.reference import Emulated, OpConfig, fp8_grouped_matmul, fp8_matmul
from pallas_kernels.fp8.tests import fp8_testing as ref64

SMALL = KernelConfig(block_m=32, block_n=32)  # several programs per dimension even on tiny shapes
PAIRED = KernelConfig(block_m=32, block_n=32, k_unroll=2)  # contraction blocks folded in pairs (+ an odd one)
ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (compiled Triton kernels)")


@pytest.fixture
def seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def _dense(backend, recipe, x, w, dy):
    """(y, dx, dw) of the recipe with `backend`'s GEMMs, compiled."""

    def run(x, w, dy):
        y, pullback = jax.vjp(lambda x, w: fp8_matmul(x, w, OpConfig(backend, recipe, jnp.dtype(w.dtype))), x, w)
        return (y, *pullback(dy))

    return jax.jit(run)(x, w, dy)


def _grouped(backend, recipe, lhs, rhs, sizes, dy):
    """(out, dlhs, drhs) of the grouped recipe with `backend`'s GEMMs, compiled."""

    def run(lhs, rhs, dy):
        cfg = OpConfig(backend, recipe, jnp.dtype(rhs.dtype))
        out, pullback = jax.vjp(lambda a, b: fp8_grouped_matmul(a, b, sizes, cfg), lhs, rhs)
        return (out, *pullback(dy))

    return jax.jit(run)(lhs, rhs, dy)


def _assert_close(got, want, tol, names, seed):
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert ref64.relative_error(g, w) <= tol, f"{name} seed={seed}"


def _dense_inputs(seed, dtype, m=200, k=300, n=136):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(ref64.random_matrix(rng, (m, k)), dtype)
    return x, jnp.asarray(ref64.random_matrix(rng, (k, n))), jnp.asarray(ref64.random_matrix(rng, (m, n)), dtype)


def _grouped_inputs(seed, sizes, rows=300, k=136, n=72):
    rng = np.random.default_rng(seed)
    lhs, dy = ref64.random_matrix(rng, (rows, k)), ref64.random_matrix(rng, (rows, n))
    rhs = ref64.random_matrix(rng, (len(sizes), k, n))
    return jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32), jnp.asarray(dy)


# (fused quantisation, activation dtype, recipe, tiles): e5m2 gradients run the kernels' mixed-format dot; 256-wide
# column tiles span two weight blocks, so the weight's scales go per line instead of one per tile.
DENSE_CASES = [
    (False, jnp.float32, Fp8Recipe(), SMALL),
    (True, jnp.bfloat16, Fp8Recipe(gradient_format="float8_e5m2", power_of_two_scales=True), PAIRED),
    (False, jnp.float32, Fp8Recipe(), KernelConfig(block_m=16, block_n=256)),
]


@pytest.mark.parametrize("fused, dtype, recipe, config", DENSE_CASES)
def test_dense_kernels_match_the_emulated_recipe(fused, dtype, recipe, config, seed):
    """M 200, K 300, N 136: partial tiles along every dimension; only the fp32 summation order may differ."""
    x, w, dy = _dense_inputs(seed, dtype)
    got = _dense(TritonBackend(fuse_quantization=fused, interpret=True, config=config), recipe, x, w, dy)
    want = _dense(Emulated(), recipe, x, w, dy)
    _assert_close(got, want, 1e-5 if dtype == jnp.float32 else 1e-2, ("y", "dx", "dw"), seed)


@pytest.mark.parametrize("fused", [False, True])
def test_forward_alone_equals_the_differentiated_forward(fused, seed):
    """Undifferentiated, the op quantises x by rows only; differentiated, by rows and columns in one pass (keeping
    the columns for dw): y must be the same bits either way."""
    x, w, _ = _dense_inputs(seed, jnp.bfloat16)
    cfg = OpConfig(TritonBackend(fuse_quantization=fused, interpret=True, config=SMALL), Fp8Recipe(), w.dtype)
    alone = jax.jit(lambda x, w: fp8_matmul(x, w, cfg))(x, w)
    differentiated = jax.jit(lambda x, w: jax.vjp(lambda x, w: fp8_matmul(x, w, cfg), x, w)[0])(x, w)
    np.testing.assert_array_equal(np.asarray(alone, np.float32), np.asarray(differentiated, np.float32))


@pytest.mark.parametrize("fused, config", [(False, SMALL), (True, PAIRED)])
def test_grouped_kernels_match_the_emulated_recipe(fused, config, seed):
    """Empty groups, groups across tile boundaries (drhs: groups of 1 and 2 column tiles), and 20 padding rows
    past sum(group_sizes)."""
    lhs, rhs, sizes, dy = _grouped_inputs(seed, [0, 100, 150, 0, 30])
    backend = TritonBackend(fuse_quantization=fused, interpret=True, config=config)
    got = _grouped(backend, Fp8Recipe(), lhs, rhs, sizes, dy)
    want = _grouped(Emulated(), Fp8Recipe(), lhs, rhs, sizes, dy)
    _assert_close(got, want, 1e-5, ("out", "dlhs", "drhs"), seed)
    assert np.all(np.asarray(got[0])[280:] == 0) and np.all(np.asarray(got[1])[280:] == 0)


# Mosaic GPU interpret mode simulates warpgroups and barriers: ~15-80 s per call on 2 shared cores.
MOSAIC_CASES = [(64, 2, 1), (128, 2, 2)]  # (tile_n, pipeline depth, contraction blocks per step)


@pytest.mark.slow
@pytest.mark.parametrize("tile_n, depth, blocks", MOSAIC_CASES)
@pytest.mark.parametrize("m, row_panel", [(200, 8), (200, 1), (100, 8)])
def test_mosaic_dense_kernel_matches_the_emulated_recipe(tile_n, depth, blocks, m, row_panel, seed):
    """The Mosaic GPU dense kernel (Mosaic GPU interpret mode) for y, dx and dw, partial tiles everywhere; 64-wide
    tiles apply the weight's block scale as one value per tile, 128-wide ones too, dw per column. On the two
    interpreted SMs each runs 1 to 3 tiles: chained pipelines (START, STEADY, STOP) and lone ones (m = 100: y's two
    tiles); tiles walked in a panel of two row tiles and row by row (row_panel 1)."""
    from pallas_kernels.fp8.pallas_mosaic_gpu import MosaicBackend, MosaicConfig

    x, w, dy = _dense_inputs(seed, jnp.bfloat16, m=m, k=300, n=136)
    config = MosaicConfig(tile_n=tile_n, max_concurrent_steps=depth, blocks_per_step=blocks, row_panel=row_panel)
    got = _dense(MosaicBackend(interpret=True, mosaic_config=config), Fp8Recipe(), x, w, dy)
    want = _dense(Emulated(), Fp8Recipe(), x, w, dy)
    _assert_close(got, want, 1e-2, ("y", "dx", "dw"), seed)
    assert ref64.relative_error(got[2], want[2]) <= 1e-5  # dw is fp32


@pytest.mark.parametrize("m_tiles, n_tiles, row_panel", [(16, 48, 8), (13, 5, 4), (3, 7, 8), (5, 2, 1)])
def test_mosaic_panel_order_visits_every_tile_once_panel_by_panel(m_tiles, n_tiles, row_panel):
    """The dense Mosaic kernel's tile walk: a permutation of the grid; panels of row_panel row tiles (the last one
    shorter) one after another, each column by column."""
    from pallas_kernels.fp8.pallas_mosaic_gpu import panel_order

    rows, columns = map(np.asarray, panel_order(jnp.arange(m_tiles * n_tiles), m_tiles, n_tiles, row_panel))
    visited = sorted(zip(rows.tolist(), columns.tolist(), strict=True))
    assert visited == [(r, c) for r in range(m_tiles) for c in range(n_tiles)]
    for panel_start in range(0, m_tiles, row_panel):
        panel_rows = min(row_panel, m_tiles - panel_start)
        visits = slice(panel_start * n_tiles, (panel_start + panel_rows) * n_tiles)
        assert set(rows[visits].tolist()) == set(range(panel_start, panel_start + panel_rows))
        np.testing.assert_array_equal(columns[visits], np.repeat(np.arange(n_tiles), panel_rows))


@pytest.mark.parametrize("field, value", [("row_panel", 0), ("tile_n", 100), ("tile_n", 512), ("blocks_per_step", 1.5)])
def test_mosaic_config_rejects_bad_values(field, value):
    from pallas_kernels.fp8.pallas_mosaic_gpu import MosaicConfig

    with pytest.raises(ValueError, match=f"MosaicConfig.{field}"):
        MosaicConfig(**{field: value})


GROUPED_MOSAIC_CASES = [(*case, "float8_e4m3fn") for case in MOSAIC_CASES] + [(128, 2, 2, "float8_e5m2")]


@pytest.mark.slow
@pytest.mark.parametrize("tile_n, depth, blocks, gradient_format", GROUPED_MOSAIC_CASES)
def test_mosaic_grouped_kernels_match_the_emulated_recipe(tile_n, depth, blocks, gradient_format, seed):
    """The Mosaic GPU grouped kernels in interpret mode: by rows (out, dlhs) and the weight gradient over each
    group's side-by-side tiles (drhs). Empty groups, groups ending inside a 64-row half, a block shared by two
    groups and the padding, 20 padding rows (zeros). e5m2 gradients: the mixed-format fallbacks (Triton by rows,
    the emulated drhs)."""
    from pallas_kernels.fp8.pallas_mosaic_gpu import MosaicBackend, MosaicConfig

    lhs, rhs, sizes, dy = _grouped_inputs(seed, [0, 100, 150, 0, 7, 23])
    config = MosaicConfig(tile_n=tile_n, max_concurrent_steps=depth, blocks_per_step=blocks)
    recipe = Fp8Recipe(gradient_format=gradient_format)
    got = _grouped(MosaicBackend(interpret=True, mosaic_config=config), recipe, lhs, rhs, sizes, dy)
    want = _grouped(Emulated(), recipe, lhs, rhs, sizes, dy)
    _assert_close(got, want, 1e-5, ("out", "dlhs", "drhs"), seed)
    assert np.all(np.asarray(got[0])[280:] == 0) and np.all(np.asarray(got[1])[280:] == 0)


def test_api_names_reach_the_kernels(seed):
    """The api's "*_interpret" names run the kernels (default tile sizes, shrunk to the tiny shapes)."""
    x, w, _ = _dense_inputs(seed, jnp.float32, m=40, k=136, n=24)
    want = blockwise_matmul(x, w, implementation="reference")
    got = jax.jit(lambda x, w: blockwise_matmul(x, w, implementation="pallas_triton_fused_interpret"))(x, w)
    assert ref64.relative_error(got, want) <= 1e-5, f"seed={seed}"
    lhs, rhs, sizes, _ = _grouped_inputs(seed, [10, 0, 30], rows=48, k=40, n=24)
    want = blockwise_grouped_matmul(lhs, rhs, sizes, implementation="reference")
    kernel = lambda a, b: blockwise_grouped_matmul(a, b, sizes, implementation="pallas_triton_interpret")
    got = jax.jit(kernel)(lhs, rhs)
    assert ref64.relative_error(got, want) <= 1e-5, f"seed={seed}"


# --------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels.
NATIVE = ["pallas_triton", "pallas_triton_fused"]


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("implementation", [*NATIVE, "pallas_mosaic_gpu"])
def test_native_equals_emulated_on_gpu(implementation):
    """Same quantised operands, so native and emulated differ by fp32 summation order (and, fused, by a rare
    rounding tie); both carry the FP8 error against the exact product."""
    seed = 5
    backend = fp8_api.backend(implementation)
    x, w, dy = _dense_inputs(seed, jnp.bfloat16, m=1000, k=1000, n=520)
    got = _dense(backend, Fp8Recipe(), x, w, dy)
    _assert_close(got, _dense(Emulated(), Fp8Recipe(), x, w, dy), 1e-2, ("y", "dx", "dw"), seed)  # bf16 outputs
    error = ref64.relative_error(got[0], np.asarray(x, np.float64) @ np.asarray(w, np.float64))
    assert 5e-3 < error < 6e-2, error
    sizes = [0, 300, 513, 0, 100, 57]
    lhs, rhs, group_sizes, gdy = _grouped_inputs(seed, sizes, rows=1000, k=520, n=264)
    got = _grouped(backend, Fp8Recipe(), lhs, rhs, group_sizes, gdy)
    emulated = _grouped(Emulated(), Fp8Recipe(), lhs, rhs, group_sizes, gdy)
    # fp32 results: summation order, plus (fused) a rare tie that XLA and the kernel round differently.
    _assert_close(got, emulated, 1e-3, ("out", "dlhs", "drhs"), seed)
    # Both against the recipe in float64: XLA on the GPU once dropped the emulated drhs's quantisation (from_fp8),
    # a 3e-2 error. Not bit for bit: XLA on the GPU can compute x / scale where the recipe says x * (1 / scale)
    # (recipe.reciprocal), and one FP8 value in about a million then lands on the other side of a rounding tie.
    fmt = "float8_e4m3fn"
    want = ref64.grouped_matmul_and_grads(*map(np.asarray, (lhs, rhs, sizes, gdy)), fmt, fmt, False)
    for name, g, e, w in zip(("out", "dlhs", "drhs"), got, emulated, want, strict=True):
        assert ref64.relative_error(e, w) <= 1e-3 and ref64.relative_error(g, w) <= 1e-3, name


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _native_step_programs(backend) -> str:
    """Compiled HLO of a dense and a grouped forward + backward with `backend`'s GEMMs."""
    x, w, dy = _dense_inputs(1, jnp.bfloat16, m=512, k=512, n=256)
    lhs, rhs, sizes, gdy = _grouped_inputs(1, [100, 0, 300, 112], rows=512, k=256, n=128)

    def dense_step(x, w, dy):
        y, pullback = jax.vjp(lambda x, w: fp8_matmul(x, w, OpConfig(backend, Fp8Recipe(), w.dtype)), x, w)
        return y, pullback(dy)

    def grouped_step(lhs, rhs, dy):
        cfg = OpConfig(backend, Fp8Recipe(), rhs.dtype)
        out, pullback = jax.vjp(lambda a, b: fp8_grouped_matmul(a, b, sizes, cfg), lhs, rhs)
        return out, pullback(dy)

    return _compiled_text(dense_step, x, w, dy) + _compiled_text(grouped_step, lhs, rhs, gdy)


def _assert_no_xla_gemm(hlo: str) -> None:
    for xla_gemm in (r"\bdot\(", "__cublas$gemm", "__cublas$lt$matmul", "__cudnn"):
        assert not re.search(xla_gemm if xla_gemm.startswith("\\") else re.escape(xla_gemm), hlo), xla_gemm


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("implementation", NATIVE)
def test_native_matmuls_multiply_fp8_operands(implementation, capfd):
    """Fails when a native matmul silently runs in bf16: the compiled program must hold no XLA GEMM, only our
    Triton kernels, and every `tt.dot` in those kernels must take two float8_e4m3fn operands."""
    fused = implementation.endswith("fused")
    capfd.readouterr()
    config = dataclasses.replace(DEFAULT_FUSED_CONFIG if fused else DEFAULT_CONFIG, debug=True)  # its tile sizes
    hlo = _native_step_programs(TritonBackend(fuse_quantization=fused, config=config))
    triton_ir = capfd.readouterr().out
    assert hlo.count("__gpu$xla.gpu.triton") >= 6, "expected 3 dense + 3 grouped Triton kernels"
    _assert_no_xla_gemm(hlo)
    dots = [line for line in triton_ir.splitlines() if "tt.dot" in line]
    assert len(dots) >= 6, triton_ir[-2000:]
    for line in dots:
        assert line.count("f8E4M3FN") >= 2 and "bf16" not in line, line


@pytest.mark.gpu
@ON_GPU
def test_mosaic_matmuls_multiply_fp8_operands():
    """The Mosaic GPU route: y, dx, dw and the grouped out, dlhs, drhs are Mosaic GPU kernels whose operands are FP8
    arrays (wgmma multiplies its shared-memory operands as they are typed); no XLA GEMM, and the only Triton kernels
    are the quantisers (pallas_triton_quantize.py)."""
    from pallas_kernels.fp8.pallas_mosaic_gpu import MosaicBackend

    hlo = _native_step_programs(MosaicBackend())
    calls = [line for line in hlo.splitlines() if 'custom_call_target="mosaic_gpu' in line]
    assert len(calls) >= 6, "expected 3 dense + 3 grouped Mosaic GPU kernels"
    for line in calls:
        assert line.split("custom-call(")[1].count("f8e4m3fn") >= 2, line
    triton_calls = [line for line in hlo.splitlines() if "__gpu$xla.gpu.triton" in line]
    assert triton_calls and all("fp8_quantize_" in line for line in triton_calls), triton_calls[:1]
    _assert_no_xla_gemm(hlo)
