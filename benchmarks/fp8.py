"""Blockwise FP8 GEMMs on one GPU: our Pallas kernels (Triton-lowered; Mosaic GPU) vs bf16, in the same run.

    python benchmarks/fp8.py            # 1. native vs emulated on the GPU, 2. timings and errors (~3 min)
    python benchmarks/fp8.py --sweep    # tile-config search per kernel and shape (time-boxed by --sweep_budget_s);
                                        # prints the winners and a TUNED_CONFIGS literal for pallas_triton.py
    python benchmarks/fp8.py --sweep --sweep_routes mosaic   # the Mosaic GPU configs only
    python benchmarks/fp8.py --quick    # small shapes, to try the script
    python benchmarks/fp8.py --sections dense      # a subset of check,dense,grouped,quant

1. Correctness first: the native routes ("pallas_triton": activations quantised by the one-pass Triton kernels
   of pallas_triton_quantize.py; "pallas_triton_fused": quantised in the GEMM; "pallas_mosaic_gpu": every GEMM on
   Mosaic GPU, the same quantisation kernels) against the
   emulated recipe on the GPU, forward and every gradient, dense and grouped, odd shapes (partial tiles, empty
   groups, padding rows). A failing case is reported and the script goes on.
2. Per shape and GEMM (dense: fwd y = x w, dgrad dx = dy w^T, wgrad dw = x^T dy; grouped: fwd, dlhs, drhs):
     bf16      jnp.dot in bf16 (cuBLAS) / the model's bf16 grouped matmul (tokamax when installed)
     kernel    our FP8 kernel on pre-quantised operands: the GEMM alone
     +quant    the kernel plus the quantisation of its activation / gradient operands by the Triton kernels
               (grouped drhs: XLA); the weight's is excluded: it is quantised once per step for two GEMMs, its
               pass has its own line
     fused     the kernel quantising raw activations / gradients in registers
     Mosaic    the Pallas Mosaic GPU kernels (pallas_mosaic_gpu.py), pre-quantised operands (grouped: also
               timed with their quantisation, "mosaic_with_quant_ms" in the JSON)
     cuBLAS    dense only: the vendor's blockwise FP8 GEMM (cuBLASLt, CUDA >= 12.9, through torch._scaled_mm) on
               the same quantised operands, against torch's bf16 matmul, and its product against our kernels'
   speed-up = bf16 ms / FP8 ms; error = relative Frobenius error vs the fp32 product (grouped: over 4 groups).
   Then the whole op, forward + backward (jax.vjp), FP8 routes vs bf16: what a layer sees (a synchronised call,
   and the device time of its kernels).
3. quant: every quantiser alone, XLA's (reference.py) beside the Triton kernel's, against the HBM floor.
Dense shapes [M, K] x [K, N]: the issue's three. Grouped: Ring-mini's MoE (16384 tokens x top-8 = 131072 rows,
256 experts, hidden 2048, expert width 512, gate|up fused to 1024 columns), uniform routing. XLA's per-tensor FP8
dot (cuBLASLt, no block scales) is listed for the forward shapes as a reference ceiling.
Timing: benchmarks.profiling.back_to_back_ms (after a compiling call, 5 rounds of --reps calls queued back to
back, one synchronisation per round: the median round's ms per call, free of per-call host latency). Arrays are
passed to the jitted functions as arguments (closing over them would bake them in as constants).
Raw results: $OUT/fp8.json (or --json_out).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.profiling import back_to_back_ms, kernel_times, median_ms
from pallas_kernels.fp8 import Fp8Recipe, pallas_triton_quantize, reference
from pallas_kernels.fp8.pallas_mosaic_gpu import (
    MosaicBackend,
    MosaicConfig,
    dense_gemm_mosaic,
    grouped_contract_gemm_mosaic,
    grouped_rows_gemm_mosaic,
)
from pallas_kernels.fp8.pallas_triton import (
    KernelConfig,
    RawOperand,
    TritonBackend,
    dense_gemm,
    grouped_contract_gemm,
    grouped_rows_gemm,
)
from pallas_kernels.fp8.recipe import TILE
from pallas_kernels.fp8.reference import (
    Emulated,
    OpConfig,
    QTensor,
    fp8_grouped_matmul,
    fp8_matmul,
    group_tiles,
    quantize_blocks,
    quantize_grouped_columns,
)
from pallas_kernels.gmm import grouped_matmul

E4M3 = jnp.dtype("float8_e4m3fn")
DENSE_SHAPES = [(16384, 2048, 6144), (32768, 2048, 2048), (16384, 4096, 12288)]
GROUPED_SHAPES = [(131072, 2048, 1024, 256), (131072, 512, 2048, 256)]  # rows, K, N, experts
QUICK_DENSE, QUICK_GROUPED = [(512, 384, 256)], [(1024, 256, 128, 8)]
SWEEP = [  # block_m, block_n, num_warps, num_stages, k_unroll; 256-wide tiles need two 32K-value fp32 accumulators
    (128, 128, 8, 3, 1), (128, 128, 8, 3, 2), (128, 128, 8, 4, 1), (128, 128, 4, 3, 1), (64, 128, 4, 4, 1),
    (128, 64, 4, 4, 2), (64, 256, 4, 3, 1), (128, 256, 8, 3, 1), (256, 128, 8, 3, 1), (128, 128, 8, 2, 2),
]  # fmt: skip
# (tile_n, pipeline depth, blocks per step, row panel): the first is the default, the second walks the tiles row by
# row; 192-wide tiles hold one 128-wide block per step in registers
MOSAIC_SWEEP = [(128, 2, 2, 8), (128, 2, 2, 1), (128, 2, 2, 4), (128, 2, 2, 16), (128, 4, 1, 8), (192, 4, 1, 8),
                (64, 4, 2, 8)]  # fmt: skip
INTERPRET = False  # --interpret: the kernels in interpret mode (a CPU dry run of this script; timings meaningless)


def routes() -> dict[str, TritonBackend]:
    return {"pallas_triton": TritonBackend(interpret=INTERPRET),
            "pallas_triton_fused": TritonBackend(fuse_quantization=True, interpret=INTERPRET),
            "pallas_mosaic_gpu": MosaicBackend(interpret=INTERPRET)}  # fmt: skip


def dense(a, b, out_dtype, cfg=None):
    return dense_gemm(a, b, out_dtype, cfg, interpret=INTERPRET)


def rows_gemm(a, b, group_sizes, out_dtype, cfg=None):
    return grouped_rows_gemm(a, b, group_sizes, out_dtype, cfg, interpret=INTERPRET)


def contract_gemm(a, b, tiles, groups, out_dtype, cfg=None):
    return grouped_contract_gemm(a, b, tiles, groups, out_dtype, cfg, interpret=INTERPRET)


def quantize_rows(x):
    return pallas_triton_quantize.quantize_rows(x, E4M3, False, interpret=INTERPRET)


def quantize_columns(x):
    return pallas_triton_quantize.quantize_columns(x, E4M3, False, interpret=INTERPRET)


def quantize_rows_and_columns(x):
    return pallas_triton_quantize.quantize_rows_and_columns(x, E4M3, False, interpret=INTERPRET)


def quantize_tiles_side_by_side(x, tiles):
    return pallas_triton_quantize.quantize_tiles_side_by_side(x, tiles, E4M3, False, interpret=INTERPRET)


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if not np.all(np.isfinite(actual)):
        return float("nan")
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def failure(e: Exception) -> str:
    """An exception as one short line for the results."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def attempt(results: list[dict], record: dict, fn: Callable[[], dict]) -> None:
    """Runs one case; a failure is recorded (first line of the error) and printed, never fatal."""
    try:
        record.update(fn())
    except Exception as e:  # noqa: BLE001 - report and go on
        record["error"] = failure(e)
        traceback.print_exc(limit=2)
    results.append(record)
    print(json.dumps(record), flush=True)


def normal(key, shape, dtype=jnp.bfloat16, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def uniform_group_sizes(rows: int, groups: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.bincount(np.random.default_rng(seed).integers(0, groups, rows), minlength=groups), jnp.int32)


def speedups(bf16_ms: float, kernel_ms: float, quant_ms: float, fused_ms: float, flops: float) -> dict:
    return {
        "bf16_ms": bf16_ms, "fp8_kernel_ms": kernel_ms, "fp8_with_quant_ms": quant_ms, "fused_ms": fused_ms,
        "bf16_tflops": flops / bf16_ms / 1e9, "fp8_kernel_tflops": flops / kernel_ms / 1e9,
        "speedup_kernel": bf16_ms / kernel_ms, "speedup_with_quant": bf16_ms / quant_ms,
        "speedup_fused": bf16_ms / fused_ms,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# 1. Correctness on the GPU.
def dense_step(backend, x, w, dy):
    """(y, dx, dw) of the recipe with `backend`'s GEMMs."""
    y, pullback = jax.vjp(lambda x, w: fp8_matmul(x, w, OpConfig(backend, Fp8Recipe(), w.dtype)), x, w)
    return (y, *pullback(dy))


def grouped_step(backend, lhs, rhs, sizes, dy):
    """(out, dlhs, drhs) of the grouped recipe with `backend`'s GEMMs."""
    cfg = OpConfig(backend, Fp8Recipe(), rhs.dtype)
    out, pullback = jax.vjp(lambda a, b: fp8_grouped_matmul(a, b, sizes, cfg), lhs, rhs)
    return (out, *pullback(dy))


def check(results: list[dict]) -> None:
    """Native routes vs the emulated recipe on this GPU: outputs and both gradients, dense and grouped."""
    keys = jax.random.split(jax.random.key(0), 6)
    dense_args = (normal(keys[0], (1000, 1000)), normal(keys[1], (1000, 520), jnp.float32, 0.05),
                  normal(keys[2], (1000, 520)))  # fmt: skip
    sizes = jnp.asarray([0, 300, 513, 0, 100, 57], jnp.int32)
    grouped_args = (normal(keys[3], (1000, 520)), normal(keys[4], (6, 520, 264), jnp.float32, 0.05), sizes,
                    normal(keys[5], (1000, 264)))  # fmt: skip
    run_dense = jax.jit(dense_step, static_argnums=0)
    run_grouped = jax.jit(grouped_step, static_argnums=0)
    want = (*run_dense(Emulated(), *dense_args), *run_grouped(Emulated(), *grouped_args))
    exact = np.asarray(dense_args[0], np.float64) @ np.asarray(dense_args[1], np.float64)
    names = ("dense_y", "dense_dx", "dense_dw", "grouped_out", "grouped_dlhs", "grouped_drhs")
    # bf16 results (y, dx, out, dlhs) agree to bf16 rounding; fp32 ones (dw, drhs) to fp32 summation order.
    tolerance = {"dense_dw": 1e-3, "grouped_drhs": 1e-3}

    def case(backend):
        got = (*run_dense(backend, *dense_args), *run_grouped(backend, *grouped_args))
        errors = {name: rel_err(g, e) for name, g, e in zip(names, got, want, strict=True)}
        ok = all(errors[name] <= tolerance.get(name, 1e-2) for name in names)
        return {**errors, "y_error_vs_exact": rel_err(got[0], exact), "pass": bool(ok)}

    for route, backend in routes().items():
        attempt(results, {"section": "check", "route": route}, functools.partial(case, backend))


# --------------------------------------------------------------------------------------------------------------
# 2. GEMM timings. Operand builders map (activation, quantised weight, output gradient[, tiles]) to a kernel's (A, B).
def _raw(t: jax.Array, axis: int) -> RawOperand:
    return RawOperand(t, axis, E4M3, False)


def dense_operands(name: str, fused: bool) -> Callable:
    if name == "fwd":
        return lambda x, wq, dy: (_raw(x, 1) if fused else quantize_rows(x), wq.input_side())
    if name == "dgrad":
        return lambda x, wq, dy: (_raw(dy, 1) if fused else quantize_rows(dy), wq.output_side())
    if fused:
        return lambda x, wq, dy: (_raw(x, 0), _raw(dy, 0))
    return lambda x, wq, dy: (quantize_columns(x), quantize_columns(dy))


DENSE_BF16 = {  # jax arrays or torch tensors
    "fwd": lambda x, w, dy: x @ w,
    "dgrad": lambda x, w, dy: dy @ w.T,
    "wgrad": lambda x, w, dy: x.T @ dy,
}


def torch_operands(a: QTensor, b: QTensor) -> tuple:
    """(mat_a [M, c], mat_b [c, N], scale_a, scale_b) for torch._scaled_mm from the QTensors A [M, c] and B [N, c],
    in the layouts cuBLASLt's blockwise FP8 GEMM takes: A's 1 x 128 scales [M, c/128] with M the fast dimension; B's
    [c/128, N] (1 x 128, line_block 1) or, for 128 x 128 blocks, [c/128, N/128] as the transpose of a contiguous
    [N/128, c/128]. The values are shared through DLPack (fp8 as bytes, viewed back as float8_e4m3fn)."""
    import torch

    def tensor(t: jax.Array):
        if t.dtype == E4M3:
            return torch.from_dlpack(jax.lax.bitcast_convert_type(t, jnp.uint8)).view(torch.float8_e4m3fn)
        return torch.from_dlpack(t)

    scale_b = tensor(b.scales) if b.line_block == 1 else tensor(b.scales.T).t()
    return tensor(a.values), tensor(b.values).t(), tensor(a.scales).t(), scale_b


def cublas_case(name: str, a: QTensor, b: QTensor, x, w16, dy, reps: int) -> tuple[dict, np.ndarray]:
    """The vendor's kernel for the same recipe: cuBLASLt's blockwise FP8 GEMM (CUDA >= 12.9, through
    torch._scaled_mm) on our quantised operands, beside torch's bf16 matmul (cuBLAS), timed the same way.
    Returns the timings and cuBLAS's product (fp32 copy of its bf16 result)."""
    import torch

    operands = torch_operands(a, b)
    fp8 = lambda: torch._scaled_mm(*operands, out_dtype=torch.bfloat16)
    bf16 = functools.partial(DENSE_BF16[name], *(torch.from_dlpack(t) for t in (x, w16, dy)))
    wait = lambda _: torch.cuda.synchronize()
    bf16_ms, fp8_ms = (back_to_back_ms(fn, reps=reps, wait=wait) for fn in (bf16, fp8))
    timings = {"torch_bf16_ms": bf16_ms, "cublas_ms": fp8_ms, "speedup_cublas": bf16_ms / fp8_ms}
    return timings, np.asarray(jnp.from_dlpack(fp8().float()))


def dense_gemm_case(name: str, x, w, dy, wq, reps: int) -> dict:
    bf16_fn, build = DENSE_BF16[name], dense_operands(name, fused=False)
    w16 = w.astype(jnp.bfloat16)
    bf16 = jax.jit(bf16_fn)
    bf16_ms = back_to_back_ms(bf16, x, w16, dy, reps=reps)
    a, b = jax.jit(build)(x, wq, dy)
    kernel = jax.jit(lambda a, b: dense(a, b, jnp.bfloat16))
    kernel_ms = back_to_back_ms(kernel, a, b, reps=reps)
    quant_ms = back_to_back_ms(jax.jit(lambda *t: dense(*build(*t), jnp.bfloat16)), x, wq, dy, reps=reps)
    fused = jax.jit(lambda *t: dense(*dense_operands(name, fused=True)(*t), jnp.bfloat16))
    fused_ms = back_to_back_ms(fused, x, wq, dy, reps=reps)
    exact = jax.jit(lambda *t: bf16_fn(*(v.astype(jnp.float32) for v in t)))(x, w, dy)
    flops = 2 * x.shape[0] * x.shape[1] * w.shape[1]
    products = {"triton": kernel(a, b)}  # the same product from each FP8 kernel, compared below
    row = {**speedups(bf16_ms, kernel_ms, quant_ms, fused_ms, flops), "fp8_error": rel_err(products["triton"], exact),
           "bf16_error": rel_err(bf16(x, w16, dy), exact)}  # fmt: skip
    try:  # the Mosaic GPU kernel on the same pre-quantised operands
        mosaic = jax.jit(lambda a, b: dense_gemm_mosaic(a, b, jnp.bfloat16, interpret=INTERPRET))
        row["mosaic_ms"] = back_to_back_ms(mosaic, a, b, reps=reps)
        row["speedup_mosaic"] = bf16_ms / row["mosaic_ms"]
        products["mosaic"] = mosaic(a, b)
        row["mosaic_vs_triton_error"] = rel_err(products["mosaic"], products["triton"])
    except Exception as e:  # noqa: BLE001 - report and go on
        row["mosaic_failed"] = failure(e)
    if not INTERPRET:
        try:
            timings, cublas = cublas_case(name, a, b, x, w16, dy, reps)
            row.update(timings)
            row.update({f"cublas_vs_{route}_error": rel_err(cublas, got) for route, got in products.items()})
        except Exception as e:  # noqa: BLE001 - no torch, CUDA < 12.9, ...: report and go on
            row["cublas_failed"] = failure(e)
    return row


def per_tensor_fp8_case(x, w, reps: int) -> dict:
    x8, w8 = x.astype(E4M3), w.astype(E4M3)
    ms = back_to_back_ms(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)), x8, w8, reps=reps)
    return {"ms": ms, "tflops": 2 * x.shape[0] * x.shape[1] * w.shape[1] / ms / 1e9}


def weight_quant_case(w, reps: int) -> dict:
    return {"ms": back_to_back_ms(jax.jit(lambda w: quantize_blocks(w, E4M3, False)), w, reps=reps)}


def fwd_bwd_step(fn: Callable) -> Callable:
    """jit(step)(a, b, cotangent, *extra) -> (fn(a, b, *extra), its gradients in a and b for the cotangent). The
    output is returned too: with the gradients alone XLA drops the forward GEMM as dead code."""

    def step(a, b, cotangent, *extra):
        out, pullback = jax.vjp(lambda a, b: fn(a, b, *extra), a, b)
        return out, pullback(cotangent)

    return jax.jit(step)


def fwd_bwd_ms(fn: Callable, args: tuple, reps: int) -> tuple[float, float]:
    """(median ms of a synchronised call, device ms of its kernels) of forward + backward: args = (a, b, *extra,
    cotangent), fn(a, b, *extra) differentiated in a, b. One synchronised call per sample: the op takes
    milliseconds, and queued calls would hold every call's outputs and gradients at once (gigabytes for the grouped
    shapes); such a call also pays the host's launch latency (0.2-0.4 ms on the H200 host), which a training step's
    queued launches hide, so the kernels' device time (the profiler's, benchmarks.profiling) is reported beside it
    (0 on CPU)."""
    a, b, *extra, cotangent = args
    step, step_args = fwd_bwd_step(fn), (a, b, cotangent, *extra)
    device_ms = sum(ms for _, ms, _ in kernel_times(step, *step_args, reps=5))
    return median_ms(step, *step_args, reps=reps), device_ms


def op_case(bf16_fn: Callable, fp8_fn: Callable, args: tuple, reps: int) -> dict:
    """Forward + backward of the whole op: bf16 vs each FP8 route (fp8_fn(backend) -> op); a failing route is
    recorded and the others still run."""
    out = {}
    out["bf16_ms"], out["bf16_device_ms"] = fwd_bwd_ms(bf16_fn, args, reps)
    for route, backend in routes().items():
        try:
            out[f"{route}_ms"], out[f"{route}_device_ms"] = fwd_bwd_ms(fp8_fn(backend), args, reps)
            out[f"{route}_speedup"] = out["bf16_ms"] / out[f"{route}_ms"]
            if out[f"{route}_device_ms"]:
                out[f"{route}_device_speedup"] = out["bf16_device_ms"] / out[f"{route}_device_ms"]
        except Exception as e:  # noqa: BLE001 - report and go on
            out[f"{route}_error"] = failure(e)
    return out


def time_dense_shape(results: list[dict], m: int, k: int, n: int, reps: int) -> None:
    keys = jax.random.split(jax.random.key(m + k + n), 3)
    x, w, dy = normal(keys[0], (m, k)), normal(keys[1], (k, n), jnp.float32, 0.02), normal(keys[2], (m, n))
    wq = jax.jit(lambda w: quantize_blocks(w, E4M3, False))(w)
    record = lambda what, shape=(m, k, n): {"section": "dense", "gemm": what, "shape": list(shape)}
    for name in DENSE_BF16:
        attempt(results, record(name), functools.partial(dense_gemm_case, name, x, w, dy, wq, reps))
    attempt(results, record("fwd xla_fp8_per_tensor"), functools.partial(per_tensor_fp8_case, x, w, reps))
    attempt(results, record("weight quantisation pass", (k, n)), functools.partial(weight_quant_case, w, reps))
    bf16 = lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16))
    fp8 = lambda backend: lambda x, w: fp8_matmul(x, w, OpConfig(backend, Fp8Recipe(), w.dtype))
    attempt(results, record("op fwd+bwd"), functools.partial(op_case, bf16, fp8, (x, w, dy), reps))


def grouped_operands(name: str, fused: bool) -> Callable:
    if name == "fwd":
        return lambda lhs, wq, dy, tiles: (_raw(lhs, 1) if fused else quantize_rows(lhs),
                                           wq.input_side())  # fmt: skip
    if name == "dlhs":
        return lambda lhs, wq, dy, tiles: (_raw(dy, 1) if fused else quantize_rows(dy),
                                           wq.output_side())  # fmt: skip
    if fused:
        return lambda lhs, wq, dy, tiles: (_raw(lhs, 0), _raw(dy, 0))
    columns = lambda t, tiles: quantize_grouped_columns(t, tiles, E4M3, False)
    return lambda lhs, wq, dy, tiles: (columns(lhs, tiles), columns(dy, tiles))


def grouped_kernel(name: str, groups: int) -> Callable:
    """(A, B, group_sizes, tiles) -> the kernel's output."""
    if name == "drhs":
        return lambda a, b, sizes, tiles: contract_gemm(a, b, tiles, groups, jnp.float32)
    return lambda a, b, sizes, tiles: rows_gemm(a, b, sizes, jnp.bfloat16)


GROUPED_BF16 = {
    "fwd": lambda lhs, r, dy, sizes: grouped_matmul(lhs, r, sizes),
    "dlhs": lambda lhs, r, dy, sizes: grouped_matmul(dy, jnp.swapaxes(r, 1, 2), sizes),
    "drhs": lambda lhs, r, dy, sizes: jax.vjp(lambda r: grouped_matmul(lhs, r, sizes), r)[1](dy)[0],
}


def grouped_error(name: str, got, lhs, rhs, dy, sizes, groups_checked: int = 4) -> float:
    """Relative error vs fp32 over the first groups (a full fp32 reference would not fit at 256 experts)."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes))])
    f64 = lambda t: np.asarray(t, np.float64)
    got, errors, norms = f64(got), 0.0, 0.0
    for g in range(groups_checked):
        rows = slice(bounds[g], bounds[g + 1])
        if name == "fwd":
            exact, part = f64(lhs[rows]) @ f64(rhs[g]), got[rows]
        elif name == "dlhs":
            exact, part = f64(dy[rows]) @ f64(rhs[g]).T, got[rows]
        else:
            exact, part = f64(lhs[rows]).T @ f64(dy[rows]), got[g]
        errors, norms = errors + np.sum((part - exact) ** 2), norms + np.sum(exact**2)
    return float(np.sqrt(errors / norms))


def grouped_gemm_case(name: str, lhs, rhs, dy, sizes, tiles, wq, reps: int) -> dict:
    build, run = grouped_operands(name, fused=False), grouped_kernel(name, rhs.shape[0])
    bf16_ms = back_to_back_ms(jax.jit(GROUPED_BF16[name]), lhs, rhs.astype(jnp.bfloat16), dy, sizes, reps=reps)
    a, b = jax.jit(build)(lhs, wq, dy, tiles)
    kernel = jax.jit(run)
    kernel_ms = back_to_back_ms(kernel, a, b, sizes, tiles, reps=reps)
    quant = jax.jit(lambda lhs, wq, dy, s, t: run(*build(lhs, wq, dy, t), s, t))
    quant_ms = back_to_back_ms(quant, lhs, wq, dy, sizes, tiles, reps=reps)
    fused = jax.jit(lambda lhs, wq, dy, s, t: run(*grouped_operands(name, True)(lhs, wq, dy, t), s, t))
    fused_ms = back_to_back_ms(fused, lhs, wq, dy, sizes, tiles, reps=reps)
    flops = 2 * lhs.shape[0] * rhs.shape[1] * rhs.shape[2]
    error = grouped_error(name, kernel(a, b, sizes, tiles), lhs, rhs, dy, sizes)
    row = {**speedups(bf16_ms, kernel_ms, quant_ms, fused_ms, flops), "fp8_error": error}
    try:  # the Mosaic GPU kernel (drhs: on operands quantised tile by tile, side by side)
        if name == "drhs":
            build = lambda lhs, wq, dy, tiles: (quantize_tiles_side_by_side(lhs, tiles),
                                                quantize_tiles_side_by_side(dy, tiles))  # fmt: skip
            run = lambda a, b, s, t: grouped_contract_gemm_mosaic(a, b, t, jnp.float32, interpret=INTERPRET)
        else:
            run = lambda a, b, s, t: grouped_rows_gemm_mosaic(a, b, s, jnp.bfloat16, interpret=INTERPRET)
        a, b = jax.jit(build)(lhs, wq, dy, tiles)
        mosaic = jax.jit(run)
        row["mosaic_ms"] = back_to_back_ms(mosaic, a, b, sizes, tiles, reps=reps)
        quant = jax.jit(lambda lhs, wq, dy, s, t: run(*build(lhs, wq, dy, t), s, t))
        row["mosaic_with_quant_ms"] = back_to_back_ms(quant, lhs, wq, dy, sizes, tiles, reps=reps)
        row["speedup_mosaic"] = bf16_ms / row["mosaic_ms"]
        row["mosaic_error"] = grouped_error(name, mosaic(a, b, sizes, tiles), lhs, rhs, dy, sizes)
    except Exception as e:  # noqa: BLE001 - report and go on
        row["mosaic_failed"] = failure(e)
    return row


def dense_equal_flops_case(lhs, rhs, reps: int) -> dict:
    ms = back_to_back_ms(jax.jit(jnp.dot), lhs, rhs[0].astype(jnp.bfloat16), reps=reps)
    return {"ms": ms, "tflops": 2 * lhs.shape[0] * rhs.shape[1] * rhs.shape[2] / ms / 1e9}


def time_grouped_shape(results: list[dict], rows: int, k: int, n: int, groups: int, reps: int) -> None:
    keys = jax.random.split(jax.random.key(rows + k + n), 3)
    lhs, rhs, dy = (
        normal(keys[0], (rows, k)),
        normal(keys[1], (groups, k, n), jnp.float32, 0.02),
        normal(keys[2], (rows, n)),
    )
    sizes = uniform_group_sizes(rows, groups)
    tiles = jax.jit(lambda s: group_tiles(s, rows, TILE))(sizes)
    wq = jax.jit(lambda w: quantize_blocks(w, E4M3, False))(rhs)
    record = lambda what: {"section": "grouped", "gemm": what, "shape": [rows, k, n, groups]}
    for name in GROUPED_BF16:
        attempt(results, record(name), functools.partial(grouped_gemm_case, name, lhs, rhs, dy, sizes, tiles, wq, reps))
    attempt(results, record("bf16 dense GEMM, equal FLOPs"), functools.partial(dense_equal_flops_case, lhs, rhs, reps))
    bf16 = lambda a, r, s: grouped_matmul(a, r.astype(jnp.bfloat16), s)
    fp8 = lambda backend: lambda a, r, s: fp8_grouped_matmul(a, r, s, OpConfig(backend, Fp8Recipe(), r.dtype))
    attempt(results, record("op fwd+bwd"), functools.partial(op_case, bf16, fp8, (lhs, rhs, sizes, dy), reps))


# --------------------------------------------------------------------------------------------------------------
# Quantisation passes alone (XLA): what the kernels' operands cost to make, against the memory floor.
HBM_BYTES_PER_S = 4.8e12  # H200


def quant_case(fn: Callable, args: tuple, reps: int) -> dict:
    """ms of one quantiser and its bytes (inputs read + outputs written once) as a fraction of the HBM floor."""
    quantise = jax.jit(fn)
    moved = sum(a.nbytes for a in jax.tree.leaves((args, quantise(*args))))
    ms = back_to_back_ms(quantise, *args, reps=reps)
    return {"ms": ms, "gb_per_s": moved / ms / 1e6, "fraction_of_floor": moved / HBM_BYTES_PER_S / (ms / 1e3)}


def time_quantisers(results: list[dict], dense_shapes, grouped_shapes, reps: int) -> None:
    """Every quantiser the routes run per step, XLA's (reference.py) beside the Triton kernels'
    (pallas_triton_quantize.py) where both exist: rows (grouped y, dlhs), columns, rows and columns from one pass
    (dense: x in the forward, dy in the backward), tiles side by side (Mosaic drhs), grouped columns (Triton drhs,
    XLA), weight blocks (XLA)."""
    xla = lambda f: lambda *t: f(*t, E4M3, False)
    for m, k, n in dense_shapes:
        x, w = normal(jax.random.key(0), (m, k)), normal(jax.random.key(1), (k, n), jnp.float32, 0.02)
        for name, by, fn, args in (("rows", "xla", xla(reference.quantize_rows), (x,)),
                                   ("rows", "triton", quantize_rows, (x,)),
                                   ("columns", "xla", xla(reference.quantize_columns), (x,)),
                                   ("columns", "triton", quantize_columns, (x,)),
                                   ("rows and columns", "xla", xla(Emulated().rows_and_columns), (x,)),
                                   ("rows and columns", "triton", quantize_rows_and_columns, (x,)),
                                   ("weight blocks", "xla", xla(quantize_blocks), (w,))):  # fmt: skip
            record = {"section": "quant", "gemm": name, "by": by, "shape": list(args[0].shape)}
            attempt(results, record, functools.partial(quant_case, fn, args, reps))
    for rows, k, _, groups in grouped_shapes:
        x, sizes = normal(jax.random.key(2), (rows, k)), uniform_group_sizes(rows, groups)
        tiles = jax.jit(functools.partial(group_tiles, num_rows=rows, block=TILE))(sizes)
        for name, by, fn in (("grouped columns", "xla", xla(quantize_grouped_columns)),
                             ("tiles side by side", "xla", xla(reference.quantize_tiles_side_by_side)),
                             ("tiles side by side", "triton", quantize_tiles_side_by_side)):  # fmt: skip
            record = {"section": "quant", "gemm": name, "by": by, "shape": [rows, k, groups]}
            attempt(results, record, functools.partial(quant_case, fn, (x, tiles), reps))


# --------------------------------------------------------------------------------------------------------------
# 3. Tile-config sweep.
def sweep_calls(dense_shapes, grouped_shapes) -> list[tuple]:
    """(TUNED_CONFIGS key, label, kernel(cfg, *args), args, flops, bf16 baseline, its args) for every kernel call
    of the benchmark."""
    calls = []
    for m, k, n in dense_shapes:
        keys = jax.random.split(jax.random.key(1), 3)
        x, w, dy = normal(keys[0], (m, k)), normal(keys[1], (k, n), jnp.float32, 0.02), normal(keys[2], (m, n))
        wq = quantize_blocks(w, E4M3, False)
        for name in DENSE_BF16:
            a, b = jax.jit(dense_operands(name, fused=False))(x, wq, dy)
            calls.append((("dense", a.values.shape[1], b.values.shape[0]), f"dense {name} {m}x{k}x{n}",
                          lambda cfg, a, b: dense(a, b, jnp.bfloat16, cfg), (a, b), 2 * m * k * n,
                          DENSE_BF16[name], (x, w.astype(jnp.bfloat16), dy)))  # fmt: skip
    for rows, k, n, groups in grouped_shapes:
        keys = jax.random.split(jax.random.key(2), 3)
        lhs, dy = normal(keys[0], (rows, k)), normal(keys[2], (rows, n))
        rhs = normal(keys[1], (groups, k, n), jnp.float32, 0.02)
        wq, rhs16 = quantize_blocks(rhs, E4M3, False), rhs.astype(jnp.bfloat16)
        sizes = uniform_group_sizes(rows, groups)
        tiles = group_tiles(sizes, rows, TILE)
        rows_kernel = lambda cfg, a, b, s, t: rows_gemm(a, b, s, jnp.bfloat16, cfg)
        contract_kernel = lambda cfg, a, b, s, t, g=groups: contract_gemm(a, b, t, g, jnp.float32, cfg)
        for name, key, kernel in (("fwd", ("rows", k, n), rows_kernel), ("dlhs", ("rows", n, k), rows_kernel),
                                  ("drhs", ("contract", rows, n), contract_kernel)):  # fmt: skip
            a, b = jax.jit(grouped_operands(name, fused=False))(lhs, wq, dy, tiles)
            calls.append((key, f"grouped {name} {rows}x{k}x{n}/{groups}", kernel, (a, b, sizes, tiles),
                          2 * rows * k * n, GROUPED_BF16[name], (lhs, rhs16, dy, sizes)))  # fmt: skip
    return calls


def sweep_case(kernel: Callable, cfg: KernelConfig | MosaicConfig, args: tuple, flops: float, reps: int,
               bf16_ms: float, default: jax.Array | None = None) -> dict:  # fmt: skip
    """ms, TFLOP/s and speed-up over bf16 of kernel(cfg, *args); with `default` (the default config's result), also
    the error against it."""
    run = jax.jit(functools.partial(kernel, cfg))
    ms = back_to_back_ms(run, *args, reps=reps)
    row = {"ms": ms, "tflops": flops / ms / 1e9, "speedup": bf16_ms / ms}
    if default is not None:
        row["error_vs_default"] = rel_err(run(*args), default)
    return row


def sweep(results: list[dict], dense_shapes, grouped_shapes, reps: int, budget_s: float, routes: str) -> None:
    """Times every SWEEP config (routes "triton") and MOSAIC_SWEEP config ("mosaic") per kernel call (pre-quantised
    operands) beside the bf16 GEMM; prints the winners and a TUNED_CONFIGS literal keyed as
    pallas_triton.kernel_config looks configs up. Mosaic configs also report their error against the default one."""
    calls, winners = sweep_calls(dense_shapes, grouped_shapes), {}
    per_call_s = budget_s / len(calls)  # each kernel call gets its share; the first config always runs
    for key, label, kernel, args, flops, bf16_fn, bf16_args in calls:
        bf16_ms = back_to_back_ms(jax.jit(bf16_fn), *bf16_args, reps=reps)
        results.append({"section": "sweep", "kernel": label, "bf16_ms": bf16_ms})
        print(f"sweep: {label}: bf16 {bf16_ms:.3f} ms ({flops / bf16_ms / 1e9:.0f} TFLOP/s)", flush=True)
        best, start = None, time.perf_counter()
        for index, (bm, bn, warps, stages, unroll) in enumerate(SWEEP if "triton" in routes else ()):
            if index and time.perf_counter() - start > per_call_s:
                print(f"sweep: {label}: time share spent after {index} configs", flush=True)
                break
            cfg = KernelConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, k_unroll=unroll)
            record = {"section": "sweep", "kernel": label, "config": dataclasses.asdict(cfg)}
            attempt(results, record, functools.partial(sweep_case, kernel, cfg, args, flops, reps, bf16_ms))
            if "ms" in record and (best is None or record["ms"] < best[1]):
                best = (cfg, record["ms"])
        if best is not None:
            winners[key] = best
            print(f"sweep: {label}: best {best[0]} at {best[1]:.3f} ms ({flops / best[1] / 1e9:.0f} TFLOP/s)")
        if key[0] != "contract" and "mosaic" in routes:
            if key[0] == "dense":
                mosaic = lambda cfg, a, b: dense_gemm_mosaic(a, b, jnp.bfloat16, cfg, interpret=INTERPRET)
            else:
                mosaic = lambda cfg, a, b, s, t: grouped_rows_gemm_mosaic(a, b, s, jnp.bfloat16, cfg,
                                                                          interpret=INTERPRET)
            default = jax.jit(functools.partial(mosaic, MosaicConfig()))(*args)
            for tile_n, steps, blocks, panel in MOSAIC_SWEEP:
                cfg = MosaicConfig(tile_n=tile_n, max_concurrent_steps=steps, blocks_per_step=blocks, row_panel=panel)
                record = {"section": "sweep", "kernel": f"{label} (Mosaic GPU)", "config": dataclasses.asdict(cfg)}
                case = functools.partial(sweep_case, mosaic, cfg, args, flops, reps, bf16_ms, default)
                attempt(results, record, case)
                if "ms" in record:
                    print(f"sweep: {label}: Mosaic GPU {cfg} {record['ms']:.3f} ms ({record['tflops']:.0f} TFLOP/s, "
                          f"{record['speedup']:.2f}x bf16)", flush=True)  # fmt: skip
    print("\n# paste into pallas_kernels/fp8/pallas_triton.py")
    print("TUNED_CONFIGS: dict[tuple[str, int, int], KernelConfig] = {")
    for key, (cfg, ms) in winners.items():
        print(f"    {key!r}: KernelConfig(block_m={cfg.block_m}, block_n={cfg.block_n}, num_warps={cfg.num_warps}, "
              f"num_stages={cfg.num_stages}, k_unroll={cfg.k_unroll}),  # {ms:.3f} ms")  # fmt: skip
    print("}")


def print_tables(results: list[dict]) -> None:
    print("\n| section | GEMM | shape | bf16 ms | FP8 kernel ms | +quant ms | fused ms | Mosaic ms | speed-up kernel / "
          "+quant / fused / Mosaic | FP8 TFLOP/s | FP8 err | bf16 err |\n|---|---|---|---|---|---|---|---|---|---|---|"
          "---|")  # fmt: skip
    nan = float("nan")
    for r in results:
        if "speedup_kernel" in r:
            print(f"| {r['section']} | {r['gemm']} | {r['shape']} | {r['bf16_ms']:.3f} | {r['fp8_kernel_ms']:.3f} | "
                  f"{r['fp8_with_quant_ms']:.3f} | {r['fused_ms']:.3f} | {r.get('mosaic_ms', nan):.3f} | "
                  f"{r['speedup_kernel']:.2f} / {r['speedup_with_quant']:.2f} / {r['speedup_fused']:.2f} / "
                  f"{r.get('speedup_mosaic', nan):.2f} | {r['fp8_kernel_tflops']:.0f} | {r['fp8_error']:.2e} | "
                  f"{r.get('bf16_error', nan):.2e} |")  # fmt: skip
            if "mosaic_failed" in r:
                print(f"|  | Mosaic GPU kernel failed: {r['mosaic_failed']} |")
    vendor = [r for r in results if "speedup_cublas" in r or "cublas_failed" in r]
    if vendor:
        print("\n| GEMM | shape | torch bf16 ms | cuBLAS blockwise FP8 ms (x torch bf16) | Mosaic ms (x jnp bf16) | "
              "cuBLAS vs Mosaic |\n|---|---|---|---|---|---|")  # fmt: skip
    for r in vendor:
        if "cublas_failed" in r:
            print(f"| {r['gemm']} | {r['shape']} | cuBLAS blockwise failed: {r['cublas_failed']} |")
            continue
        print(f"| {r['gemm']} | {r['shape']} | {r['torch_bf16_ms']:.3f} | {r['cublas_ms']:.3f} "
              f"({r['speedup_cublas']:.2f}) | {r.get('mosaic_ms', nan):.3f} ({r.get('speedup_mosaic', nan):.2f}) | "
              f"{r.get('cublas_vs_mosaic_error', nan):.1e} |")  # fmt: skip
    print("\n| section | what | shape | result |\n|---|---|---|---|")
    for r in results:
        if "speedup_kernel" not in r:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                     if k not in ("section", "gemm", "shape", "route")}  # fmt: skip
            print(f"| {r['section']} | {r.get('gemm', r.get('route'))} | {r.get('shape', '')} | {shown} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="search tile configs instead of the timing tables")
    parser.add_argument("--sweep_budget_s", type=float, default=200.0)
    parser.add_argument("--sweep_routes", default="triton,mosaic", help="kernel families the sweep times")
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--sections", default="check,dense,grouped", help="comma-separated subset of "
                        "check,dense,grouped,quant (quant: the quantisation passes alone vs the HBM floor)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json_out", default="")
    parser.add_argument("--interpret", action="store_true", help="kernels in interpret mode (CPU dry run)")
    args = parser.parse_args()
    global INTERPRET
    INTERPRET = args.interpret
    dense_shapes, grouped_shapes = (QUICK_DENSE, QUICK_GROUPED) if args.quick else (DENSE_SHAPES, GROUPED_SHAPES)
    print(f"fp8 benchmark on {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results: list[dict[str, Any]] = []
    sections = args.sections.split(",")
    if args.sweep:  # the dense and grouped sections' kernel calls
        dense_shapes, grouped_shapes = (shapes if name in sections else [] for name, shapes in
                                        (("dense", dense_shapes), ("grouped", grouped_shapes)))  # fmt: skip
        sweep(results, dense_shapes, grouped_shapes, max(5, args.reps // 2), args.sweep_budget_s, args.sweep_routes)
    else:
        if "check" in sections:
            check(results)
        for shape in dense_shapes if "dense" in sections else ():
            time_dense_shape(results, *shape, args.reps)
        for shape in grouped_shapes if "grouped" in sections else ():
            time_grouped_shape(results, *shape, args.reps)
        if "quant" in sections:
            time_quantisers(results, dense_shapes, grouped_shapes, args.reps)
        print_tables(results)
    out = args.json_out or (os.path.join(os.environ["OUT"], "fp8.json") if os.environ.get("OUT") else "")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"raw results: {out}")


if __name__ == "__main__":
    main()
