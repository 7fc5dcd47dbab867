"""Lightning attention on one GPU: every Triton kernel configuration checked, swept per shape, and timed against fla.

    PYTHONPATH=/tmp/site:. python benchmarks/lightning.py [--quick] [--skip-check] [--no-decode] [--no-fla]
        [--shapes 'B,T,H,D;...']

One run, in order (progress lines are flushed as they come; nothing that fails stops the run):
1. check: every forward configuration the tuning can pick (`tuning.FORWARD_CONFIGS`, single pass and split)
   against the pure-JAX reference on the GPU (bf16, documents, a carried state; 1000 tokens, not a multiple of
   the chunk), the gradients (with and without documents) and every decode configuration; `--fp32-check` adds
   the fp32 kernels (exact matmuls: minutes of compile). A configuration that fails is left out of the sweep.
2. prefill sweep, per shape: each candidate (forward config x sequence splits, see `candidates`) compiled in
   parallel, then timed; the fastest one's fwd+bwd; the cost model's own pick (`tuning.modelled_tuning`) for
   comparison; fla `chunk_simple_gla(q, k, v, g_gamma=-rates, scale=...)` fwd and fwd+bwd, timed the same way
   as fla does (`triton.testing.do_bench` median).
3. decode, batch 1 / 64 / 256 (H16 D128): each decode config as a chain of steps inside one jit, both unrolled
   (what a generation step with many layers looks like) and as a `fori_loop` (adds XLA's per-iteration loop
   cost), plus the kernel's own device time from a profiler trace; the XLA reference and fla for comparison.
4. tables: prefill and decode results, targets met or missed, the measured winners as Python literals to paste
   into pallas_kernels/lightning/tuning.py (MEASURED_FORWARD, MEASURED_DECODE, measured step_us per config), and
   everything raw in $OUT/lightning.json when $OUT is set.

JAX times: median over groups of back-to-back calls (dispatch overlaps the previous call, as in a model), after
warm-up; compile excluded. Floors at 4.8 TB/s (H200): fwd reads q, k, v and writes o (8·B·T·H·D bytes, bf16);
fwd+bwd adds reading q, k, v, do and writing dq, dk, dv (22·B·T·H·D); decode reads and writes the fp32 state
(8·B·H·D²).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.profiling import kernel_times
from pallas_kernels.lightning import lightning_attention_reference, lightning_decode_reference, tuning
from pallas_kernels.lightning.pallas_triton import lightning_attention_triton, lightning_decode_triton

HBM_BYTES_PER_S = 4.8e12
SHAPES = [(4, 8192, 16, 128), (1, 32768, 16, 128), (2, 16384, 32, 128), (8, 4096, 32, 128), (2, 10000, 16, 128)]
QUICK_SHAPES = [(4, 8192, 16, 128), (2, 10000, 16, 128)]
DECODE_BATCHES = [1, 64, 256]
DECODE_HEADS, DECODE_DIM, DECODE_STEPS = 16, 128, 16
CHECK_SHAPE, CHECK_STARTS, CHECK_DECODE_BATCH = (2, 1000, 4, 128), [128, 300, 301, 384, 777], 64
ours_forward, ours_decode = lightning_attention_triton, lightning_decode_triton
BASELINE = dict(chunk=64, block_v=32, num_warps=4, num_stages=3, splits=1)  # the kernel before this sweep
START = time.perf_counter()


def log(*parts) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s]", *parts, flush=True)


def short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rates(heads: int) -> jax.Array:
    return jnp.asarray(np.geomspace(1e-3, 2.0, heads), jnp.float32)


def config_name(cfg: dict) -> str:
    return "c{chunk}/v{block_v}/w{num_warps}/s{num_stages}/p{splits}".format(**cfg)


def kernel_name(cfg: dict) -> str:
    """config_name without the splits: the kernel build a check vouches for."""
    return config_name(dict(cfg, splits=0)).rsplit("/", 1)[0]


def tuning_of(cfg: dict) -> tuning.ForwardTuning:
    return tuning.ForwardTuning(**{f.name: cfg[f.name] for f in dataclasses.fields(tuning.ForwardTuning)})


def compile_all(jobs: dict, parallel: bool, donate_first: bool = False) -> dict:
    """jobs: name -> (fn, args). Lowers each in turn, compiles them on a thread pool (XLA and Triton compile
    outside the GIL); returns name -> compiled executable or the exception it raised."""
    lowered = {}
    for name, (fn, args) in jobs.items():
        try:
            lowered[name] = jax.jit(fn, donate_argnums=0 if donate_first else ()).trace(*args).lower()
        except Exception as e:  # noqa: BLE001 - reported per candidate
            lowered[name] = e

    def build(item):
        name, low = item
        if isinstance(low, Exception):
            return name, low
        try:
            return name, low.compile()
        except Exception as e:  # noqa: BLE001
            return name, e

    workers = min(8, os.cpu_count() or 1) if parallel else 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(build, lowered.items()))


def time_ms(fn, *args, groups: int = 15, per_group: int = 5) -> float:
    """Median ms per call over `groups` groups of `per_group` back-to-back calls, after two warm-up calls."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(groups):
        start = time.perf_counter()
        for _ in range(per_group):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / per_group * 1e3)
    return statistics.median(samples)


# ------------------------------------------------------------------------------------------------------ check


def check_kernels(parallel: bool, fp32: bool) -> tuple[list[dict], set[str]]:
    """Kernels vs the pure-JAX reference on the GPU: every forward config (single pass and split) in bf16 with
    documents and a carried state, the gradients in bf16 (with and without documents), every decode config; with
    `fp32`, also the fp32 configuration (exact matmuls, tolerance 1e-5; slow to compile). Returns (records,
    names of the forward configs whose bf16 check failed: the sweep skips those)."""
    batch, seq, heads, dim = CHECK_SHAPE
    keys = jax.random.split(jax.random.key(0), 8)
    starts = CHECK_STARTS  # on and off chunk / piece boundaries
    seg = jnp.asarray(np.cumsum(np.isin(np.arange(seq), starts)[None].repeat(batch, 0), 1), jnp.int32)
    decay = rates(heads)
    x32 = [jax.random.normal(kk, (batch, seq, heads, dim)) for kk in keys[:3]]
    x16 = [x.astype(jnp.bfloat16) for x in x32]
    x16_up = [x.astype(jnp.float32) for x in x16]  # what the bf16 kernels see, in fp32 math
    s0 = jax.random.normal(keys[3], (batch, heads, dim, dim))
    configs = [
        dict(chunk=c.chunk, block_v=c.block_v, num_warps=c.num_warps, num_stages=c.num_stages, splits=s)
        for c in tuning.FORWARD_CONFIGS
        for s in (1, 3)
    ]
    cases = [("bf16", x16, x16_up, 1e-2, cfg) for cfg in configs]
    if fp32:  # the first config, single pass and split: what fp32 inputs get (tuning.modelled_tuning)
        cases += [("fp32", x32, x32, 1e-5, cfg) for cfg in configs[:2]]
    jobs, expected = {}, {}
    reference = {
        "fp32": lightning_attention_reference(*x32, decay, initial_state=s0, segment_ids=seg),
        "bf16": lightning_attention_reference(*x16_up, decay, initial_state=s0, segment_ids=seg),
    }
    for dtype, xs, _, tol, cfg in cases:
        name = f"fwd {dtype} docs+state {config_name(cfg)}"
        jobs[name] = (
            lambda q, k, v, c=cfg: ours_forward(q, k, v, decay, initial_state=s0, segment_ids=seg, **c),
            xs,
        )
        expected[name] = (reference[dtype], tol, cfg if dtype == "bf16" else None)
    cot_o = jax.random.normal(keys[4], x32[0].shape)
    cot_s = jax.random.normal(keys[5], s0.shape)

    def grads(fn, segments):
        def loss(q, k, v, s):
            out, fin = fn(q, k, v, decay, initial_state=s, segment_ids=segments)
            return jnp.sum(out.astype(jnp.float32) * cot_o) + jnp.sum(fin * cot_s)

        return jax.grad(loss, argnums=(0, 1, 2, 3))

    grad_cases = [("bf16", x16, x16_up, 1e-2)] + ([("fp32", x32, x32, 1e-5)] if fp32 else [])
    for segments, label in ((None, "plain"), (seg, "docs")):
        for dtype, xs, ref_xs, tol in grad_cases:
            name = f"grads {dtype} {label} (dq, dk, dv, ds0)"
            jobs[name] = (grads(ours_forward, segments), (*xs, s0))
            expected[name] = (jax.jit(grads(lightning_attention_reference, segments))(*ref_xs, s0), tol, None)
    dq, dk, dv = (jax.random.normal(kk, (CHECK_DECODE_BATCH, heads, dim)) for kk in keys[5:8])
    state = jax.random.normal(keys[0], (CHECK_DECODE_BATCH, heads, dim, dim))
    want = lightning_decode_reference(dq, dk, dv, decay, state)
    for dcfg in tuning.DECODE_CONFIGS:
        name = f"decode fp32 v{dcfg.block_v}/w{dcfg.num_warps}"
        jobs[name] = (
            lambda q, k, v, s, c=dcfg: ours_decode(q, k, v, decay, s, block_v=c.block_v, num_warps=c.num_warps),
            (dq, dk, dv, state),
        )
        expected[name] = (want, 1e-5, None)
    log(f"check: compiling {len(jobs)} kernels")
    compiled = compile_all(jobs, parallel)
    records, failed = [], set()
    for name, exe in compiled.items():
        want, tol, cfg = expected[name]
        record = dict(name=name, tolerance=tol)
        try:
            if isinstance(exe, Exception):
                raise exe
            args = jobs[name][1]
            if name.startswith("decode"):
                args = (*args[:3], args[3] + 0.0)  # the kernel donates the state
            got = jax.block_until_ready(exe(*args))
            errors = [rel_err(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
            record.update(errors=errors, ok=all(e <= tol for e in errors))
        except Exception as e:  # noqa: BLE001
            record.update(error=short(e), ok=False)
        if not record["ok"] and cfg is not None:  # a bf16 forward config (the dtype the sweep times), any splits
            failed.add(kernel_name(cfg))
        records.append(record)
        detail = record.get("error") or " ".join(f"{e:.1e}" for e in record["errors"])
        log(f"check {name}: {detail} {'OK' if record['ok'] else 'FAIL'}")
    return records, failed


# ----------------------------------------------------------------------------------------------------- prefill


def candidates(shape, quick: bool) -> list[dict]:
    """Per forward config: the sequence splits around the point where the programs first fill the GPU (one wave
    of programs_per_sm x SMs) and the single pass unless it leaves over half the SMs idle; plus the cost model's
    pick and the old default (single pass, 32-column blocks)."""
    batch, seq, heads, dim = shape
    found = {config_name(BASELINE): BASELINE}
    for c in tuning.FORWARD_CONFIGS:
        options = tuning.split_options(seq, c.chunk)
        programs = (dim // min(c.block_v, dim)) * heads * batch
        slots = tuning.SMS * c.programs_per_sm
        fill = next((s for s in options if programs * s >= slots), options[-1])
        single = {1} if programs * 2 >= slots else set()  # a single pass that leaves most SMs idle: not worth a try
        splits = {1} if quick else (single | {fill, fill // 2}) & set(options)
        for s in sorted(splits):
            cfg = dict(chunk=c.chunk, block_v=c.block_v, num_warps=c.num_warps, num_stages=c.num_stages, splits=s)
            found[config_name(cfg)] = cfg
    model = dataclasses.asdict(tuning.modelled_tuning(*shape))
    found[config_name(model)] = model
    return list(found.values())


def fla_ops():
    try:
        import torch
        import triton
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - fla-core missing: time ours only
        log(f"fla unavailable: {short(e)}")
        return None
    return torch, triton, chunk_simple_gla


def time_fla(fla, shape) -> dict:
    torch, triton, chunk_simple_gla = fla
    batch, seq, heads, dim = shape
    q, k, v, do = (torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(4))
    g_gamma = -torch.tensor(np.asarray(rates(heads)), device="cuda", dtype=torch.float32)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd():
        return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=dim**-0.5, output_final_state=True)

    def fwd_bwd():
        out, _ = chunk_simple_gla(*xs, g_gamma=g_gamma, scale=dim**-0.5, output_final_state=True)
        out.backward(do)

    row = {}
    for mode, run in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        try:
            run()  # autotune outside the timing
            row[f"fla_{mode}_ms"] = triton.testing.do_bench(run, grad_to_none=xs, return_mode="median")
        except Exception as e:  # noqa: BLE001
            row[f"fla_{mode}_error"] = short(e)
            log(f"fla {shape} {mode} failed: {short(e)}")
    return row


def sweep_shape(shape, quick: bool, parallel: bool, skip: set[str], fla) -> dict:
    batch, seq, heads, dim = shape
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
    decay = rates(heads)
    cands = [c for c in candidates(shape, quick) if kernel_name(c) not in skip]
    log(f"{shape}: compiling {len(cands)} forward candidates")
    jobs = {config_name(c): (lambda q, k, v, c=c: ours_forward(q, k, v, decay, **c), (q, k, v)) for c in cands}
    compiled = compile_all(jobs, parallel)
    rows = []
    for cfg in cands:
        name = config_name(cfg)
        row = dict(config=cfg, name=name)
        try:
            exe = compiled[name]
            if isinstance(exe, Exception):
                raise exe
            row["fwd_ms"] = time_ms(exe, q, k, v)
            log(f"{shape} {name}: fwd {row['fwd_ms']:.3f} ms")
        except Exception as e:  # noqa: BLE001
            row["error"] = short(e)
            log(f"{shape} {name}: FAILED {row['error']}")
        rows.append(row)
    timed = [r for r in rows if "fwd_ms" in r]
    result = dict(
        shape=shape, candidates=rows, model_pick=config_name(dataclasses.asdict(tuning.modelled_tuning(*shape)))
    )
    if not timed:
        return result
    best = min(timed, key=lambda r: r["fwd_ms"])
    result.update(best=best["name"], best_config=best["config"], fwd_ms=best["fwd_ms"])

    def fwd_bwd(q, k, v, do):
        (out, fin), pullback = jax.vjp(lambda q, k, v: ours_forward(q, k, v, decay, **best["config"]), q, k, v)
        return pullback((do, jnp.zeros_like(fin)))

    try:
        result["fwdbwd_ms"] = time_ms(jax.jit(fwd_bwd), q, k, v, do)
        log(f"{shape} fwd+bwd with {best['name']}: {result['fwdbwd_ms']:.3f} ms")
    except Exception as e:  # noqa: BLE001
        result["fwdbwd_error"] = short(e)
        log(f"{shape} fwd+bwd FAILED {result['fwdbwd_error']}")
    try:
        device = kernel_times(compiled[best["name"]], q, k, v)
        result["fwd_device_ms"] = sum(ms for name, ms, _ in device if "lightning" in name)
        result["fwd_kernels"] = [(name, ms) for name, ms, _ in device[:4]]
    except Exception as e:  # noqa: BLE001 - the profiler is optional
        result["profile_error"] = short(e)
    if fla is not None:
        result.update(time_fla(fla, shape))
    return result


# ------------------------------------------------------------------------------------------------------ decode


def time_fla_decode(fla, batch: int, decay) -> dict:
    """fla's fused recurrent kernel on one token: simple_gla with g_gamma, else lightning_attn (its own decays)."""
    torch, triton, _ = fla
    heads, dim = DECODE_HEADS, DECODE_DIM
    tq, tk, tv = (torch.randn(batch, 1, heads, dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    ts = torch.randn(batch, heads, dim, dim, device="cuda")
    g_gamma = -torch.tensor(np.asarray(decay), device="cuda", dtype=torch.float32)
    errors = []
    for name in ("simple_gla", "lightning_attn"):
        try:
            if name == "simple_gla":
                from fla.ops.simple_gla import fused_recurrent_simple_gla

                def run():
                    return fused_recurrent_simple_gla(
                        tq, tk, tv, g_gamma=g_gamma, initial_state=ts, output_final_state=True
                    )
            else:
                from fla.ops.lightning_attn import fused_recurrent_lightning_attn

                def run():
                    return fused_recurrent_lightning_attn(
                        tq, tk, tv, layer_idx=0, num_layers=12, initial_state=ts, output_final_state=True
                    )

            run()
            return {"fla us": triton.testing.do_bench(run, return_mode="median") * 1e3, "fla op": name}
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {short(e)}")
    return {"fla error": "; ".join(errors)}


def time_decode(batch: int, fla, parallel: bool) -> dict:
    heads, dim, steps = DECODE_HEADS, DECODE_DIM, DECODE_STEPS
    keys = jax.random.split(jax.random.key(2), 4)
    q, k, v = (jax.random.normal(kk, (batch, heads, dim), jnp.bfloat16) for kk in keys[:3])
    state = jax.random.normal(keys[3], (batch, heads, dim, dim), jnp.float32)
    decay = rates(heads)

    def chains(step):
        def unrolled(s):
            for _ in range(steps):
                s = step(s)
            return s

        def looped(s):
            return jax.lax.fori_loop(0, steps, lambda _, s: step(s), s)

        return unrolled, looped

    variants = {}
    for dcfg in tuning.DECODE_CONFIGS:

        def step(s, c=dcfg):
            return ours_decode(q, k, v, decay, s, block_v=c.block_v, num_warps=c.num_warps)[1]

        unrolled, looped = chains(step)
        variants[f"v{dcfg.block_v}/w{dcfg.num_warps} unrolled"] = unrolled
        variants[f"v{dcfg.block_v}/w{dcfg.num_warps} fori"] = looped
    variants["reference unrolled"] = chains(lambda s: lightning_decode_reference(q, k, v, decay, s)[1])[0]
    compiled = compile_all({name: (fn, (state,)) for name, fn in variants.items()}, parallel, donate_first=True)
    row = {}
    for name, exe in compiled.items():
        try:
            if isinstance(exe, Exception):
                raise exe
            s = jax.block_until_ready(exe(state + 0.0))
            samples = []
            for _ in range(15):  # groups of 5 back-to-back chains: host dispatch overlaps the device work
                start = time.perf_counter()
                for _ in range(5):
                    s = exe(s)
                jax.block_until_ready(s)
                samples.append((time.perf_counter() - start) / (5 * steps) * 1e6)
            row[f"{name} us"] = statistics.median(samples)
            if not np.all(np.isfinite(np.asarray(s[0, 0, 0]))):
                row[f"{name} error"] = "non-finite state"
        except Exception as e:  # noqa: BLE001
            row[f"{name} error"] = short(e)
    ours = {n[: -len(" unrolled us")]: t for n, t in row.items() if n.endswith(" unrolled us") and "reference" not in n}
    if ours:
        best = min(ours, key=ours.get)
        row["best"] = best
        try:
            chain = compiled[f"{best} unrolled"]
            device = kernel_times(lambda: chain(state + 0.0))  # a fresh copy per call: the chain donates it
            row["best device us"] = sum(ms for name, ms, _ in device if "lightning" in name) * 1e3 / steps
        except Exception as e:  # noqa: BLE001
            row["profile_error"] = short(e)
    if fla is not None:
        row.update(time_fla_decode(fla, batch, decay))
    log(
        f"decode B{batch}: " + ", ".join(f"{n}={t:.1f}" if isinstance(t, float) else f"{n}={t}" for n, t in row.items())
    )
    return row


# ----------------------------------------------------------------------------------------------------- report


def step_us_of(cfg: dict, shape, ms: float) -> float:
    """Measured µs per chunk step of a single-pass run: its time over the model's waves x steps."""
    fields = (cfg["chunk"], cfg["block_v"], cfg["num_warps"], cfg["num_stages"])
    model = next((c for c in tuning.FORWARD_CONFIGS if (c.chunk, c.block_v, c.num_warps, c.num_stages) == fields), None)
    if model is None or cfg["splits"] != 1:
        return float("nan")
    return ms * 1e3 / tuning.serial_steps(model, *shape, 1)


def report(prefill: list[dict], decode: dict, checks: list[dict]) -> list[str]:
    lines = [
        "",
        "| shape B,T,H,D | ours fwd ms | fla fwd ms | ours/fla | % HBM floor | model pick ms | "
        "ours fwd+bwd ms | fla fwd+bwd ms | ours/fla | winning config |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    targets = []
    for r in prefill:
        b, t, h, d = r["shape"]
        if "fwd_ms" not in r:
            lines.append(f"| {b},{t},{h},{d} | failed | | | | | | | | |")
            continue
        floor = 8 * b * t * h * d / HBM_BYTES_PER_S * 1e3
        model = next((c.get("fwd_ms", nan) for c in r["candidates"] if c["name"] == r["model_pick"]), nan)
        fwd_ratio = r["fwd_ms"] / r.get("fla_fwd_ms", nan)
        bwd_ratio = r.get("fwdbwd_ms", nan) / r.get("fla_fwdbwd_ms", nan)
        lines.append(
            f"| {b},{t},{h},{d} | {r['fwd_ms']:.3f} | {r.get('fla_fwd_ms', nan):.3f} | {fwd_ratio:.2f} | "
            f"{100 * floor / r['fwd_ms']:.0f}% | {model:.3f} | {r.get('fwdbwd_ms', nan):.3f} | "
            f"{r.get('fla_fwdbwd_ms', nan):.3f} | {bwd_ratio:.2f} | {r['best']} |"
        )
        targets.append(f"fwd <= 0.8x fla at {r['shape']}: {fwd_ratio:.2f} {'met' if fwd_ratio <= 0.8 else 'MISSED'}")
        targets.append(
            f"fwd+bwd <= 0.7x fla at {r['shape']}: {bwd_ratio:.2f} {'met' if bwd_ratio <= 0.7 else 'MISSED'}"
        )
        if r["shape"] == (4, 8192, 16, 128):
            share = floor / r["fwd_ms"]
            targets.append(
                f"fwd >= 50% of the HBM floor at (4, 8192, 16, 128): {100 * share:.0f}% "
                f"{'met' if share >= 0.5 else 'MISSED'}"
            )
    lines += [
        "",
        f"| decode B (H{DECODE_HEADS} D{DECODE_DIM}) | best config | µs/step unrolled | µs/step fori | "
        "device µs/step | XLA ref µs | fla µs | % state floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, row in decode.items():
        if "best" not in row:
            lines.append(f"| {batch} | failed | | | | | | |")
            continue
        us = row[f"{row['best']} unrolled us"]
        floor = 8 * batch * DECODE_HEADS * DECODE_DIM**2 / HBM_BYTES_PER_S * 1e6
        lines.append(
            f"| {batch} | {row['best']} | {us:.1f} | {row.get(row['best'] + ' fori us', nan):.1f} | "
            f"{row.get('best device us', nan):.1f} | {row.get('reference unrolled us', nan):.1f} | "
            f"{row.get('fla us', nan):.1f} | {100 * floor / us:.0f}% |"
        )
        if batch == 1:
            targets.append(f"decode B1 <= 10 µs/step: {us:.1f} {'met' if us <= 10 else 'MISSED'}")
        else:
            targets.append(
                f"decode B{batch} >= 60% of the state floor: {100 * floor / us:.0f}% "
                f"{'met' if floor / us >= 0.6 else 'MISSED'}"
            )
    lines += ["", "Targets:"] + [f"- {t}" for t in targets]
    bad = [c["name"] for c in checks if not c["ok"]]
    lines.append(f"- GPU checks: {len(checks) - len(bad)}/{len(checks)} passed" + (f"; FAILED: {bad}" if bad else ""))

    lines += [
        "",
        "# Paste into pallas_kernels/lightning/tuning.py (measured on "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}):",
        "MEASURED_FORWARD = {",
    ]
    for r in prefill:
        if "best_config" in r:
            key = tuning.forward_key(*r["shape"])
            lines.append(f"    {key}: {tuning_of(r['best_config'])},  # {r['shape']}: {r['fwd_ms']:.3f} ms")
    lines += ["}", "MEASURED_DECODE = {"]
    for batch, row in decode.items():
        if "best" in row:
            block_v, warps = (int(x[1:]) for x in row["best"].split("/"))
            lines.append(
                f"    ({batch * DECODE_HEADS}, {DECODE_DIM}): DecodeTuning(block_v={block_v}, "
                f"num_warps={warps}),  # B{batch}: {row[row['best'] + ' unrolled us']:.1f} µs/step"
            )
    lines.append("}")
    steps: dict[str, list[float]] = {}
    for r in prefill:
        for c in r["candidates"]:
            if "fwd_ms" in c and c["config"]["splits"] == 1:
                steps.setdefault(kernel_name(c["config"]), []).append(step_us_of(c["config"], r["shape"], c["fwd_ms"]))
    lines.append("# measured step_us per FORWARD_CONFIGS entry (single pass, median over shapes):")
    for name, values in steps.items():
        lines.append(f"#   {name}: step_us={statistics.median(values):.2f}  (from {len(values)} shapes)")
    return lines


def configure_cpu_smoke() -> None:
    """Tiny shapes and interpret-mode kernels: runs every code path of this script on a CPU (no timings worth
    reading), so a GPU run does not die on a script bug."""
    global ours_forward, ours_decode, CHECK_SHAPE, CHECK_STARTS, CHECK_DECODE_BATCH, SHAPES, QUICK_SHAPES
    global DECODE_BATCHES, DECODE_HEADS, DECODE_DIM, DECODE_STEPS
    ours_forward = functools.partial(lightning_attention_triton, interpret=True)
    ours_decode = functools.partial(lightning_decode_triton, interpret=True)
    CHECK_SHAPE, CHECK_STARTS, CHECK_DECODE_BATCH = (1, 300, 2, 16), [64, 100, 256], 2
    SHAPES = QUICK_SHAPES = [(1, 300, 2, 16)]
    DECODE_BATCHES, DECODE_HEADS, DECODE_DIM, DECODE_STEPS = [1, 2], 2, 16, 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, single-pass candidates only")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--fp32-check", action="store_true", help="also check the fp32 kernels (minutes of ptxas)")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--serial-compile", action="store_true", help="compile candidates one at a time")
    parser.add_argument("--shapes", default="", help="B,T,H,D[;B,T,H,D...] instead of the default shapes")
    parser.add_argument("--cpu-smoke", action="store_true", help=configure_cpu_smoke.__doc__.split(":")[0])
    args = parser.parse_args()
    if args.cpu_smoke:
        configure_cpu_smoke()
    parallel = not args.serial_compile
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; quick={args.quick}")
    results = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, checks=[], decode={}, prefill=[])
    checks, failed = ([], set()) if args.skip_check else check_kernels(parallel, args.fp32_check)
    results["checks"] = checks
    save(results)
    fla = None if args.no_fla else fla_ops()
    decode = {}
    for batch in [] if args.no_decode else DECODE_BATCHES:  # before the prefill sweep: short, and kept if that dies
        try:
            decode[batch] = time_decode(batch, fla, parallel)
        except Exception as e:  # noqa: BLE001
            log(f"decode B{batch}: FAILED {short(e)}")
        results["decode"] = {str(b): r for b, r in decode.items()}
        save(results)
    if args.shapes:
        shapes = [tuple(int(x) for x in item.split(",")) for item in args.shapes.split(";")]
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    prefill = []
    for shape in shapes:
        try:
            prefill.append(sweep_shape(shape, args.quick, parallel, failed, fla))
        except Exception as e:  # noqa: BLE001 - keep the other shapes
            log(f"{shape}: FAILED {short(e)}\n{traceback.format_exc(limit=3)}")
        results["prefill"] = prefill
        save(results)
    results["report"] = report(prefill, decode, checks)
    print("\n".join(results["report"]), flush=True)
    save(results)
    log("done")


def save(results: dict) -> None:
    """Writes everything so far to $OUT/lightning.json (after each phase: a run cut short keeps what it did)."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "lightning.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
