"""Lightning attention on one GPU: our Pallas (Triton-lowered) kernels vs the pure-JAX reference vs fla (torch).

Run on the H100:  PYTHONPATH=/tmp/site:. python benchmarks/lightning.py [--skip-check] [--sweep]
First checks every GPU kernel against the reference on the GPU (forward, all gradients, decode; fp32 and bf16),
then times fwd and fwd+bwd at the issue's shapes and decode at B in {1, 64, 256}, and prints a table last.
Times: JAX = median over >= 20 groups of 5 back-to-back calls (after warm-up, compile excluded); torch/fla =
`triton.testing.do_bench` median. Floors at 3.35e12 B/s: fwd reads q,k,v and writes o (8·B·T·H·D bytes, bf16);
fwd+bwd adds reading q,k,v,do and writing dq,dk,dv (22·B·T·H·D bytes); decode reads and writes the fp32 state
(8·B·H·D² bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lightning import lightning_attention_reference, lightning_decode_reference
from pallas_kernels.lightning.pallas_triton import lightning_attention_triton, lightning_decode_triton

HBM_BYTES_PER_S = 3.35e12
SHAPES = [(4, 8192, 16, 128), (1, 32768, 16, 128), (2, 16384, 32, 128)]
DECODE_BATCHES = [1, 64, 256]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def time_jax(fn, *args, groups: int = 20, per_group: int = 5) -> float:
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


def rates(heads: int) -> jax.Array:
    return jnp.asarray(np.geomspace(1e-3, 2.0, heads), jnp.float32)


def _gradients(fn, q, k, v, s0, decay, segments, cot_o, cot_s):
    """d/d(q, k, v, s0) of a random projection of (out, final_state), plus (out, final_state)."""
    def loss(q, k, v, s0):
        out, fin = fn(q, k, v, decay, initial_state=s0, segment_ids=segments)
        return jnp.sum(out.astype(jnp.float32) * cot_o) + jnp.sum(fin * cot_s), (out, fin)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, s0)


def check_gpu_kernels() -> list[str]:
    """Kernel vs reference on the GPU: odd length, segments, carried state, slow..fast decays, fp32 and bf16."""
    lines = []
    batch, seq, heads, dim = 2, 1000, 4, 128
    keys = jax.random.split(jax.random.key(0), 8)
    seg = jnp.asarray(np.cumsum(np.isin(np.arange(seq), [128, 300, 301, 777])[None].repeat(batch, 0), 1))
    decay = rates(heads)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        q, k, v = (jax.random.normal(kk, (batch, seq, heads, dim)).astype(dtype) for kk in keys[:3])
        s0 = jax.random.normal(keys[3], (batch, heads, dim, dim))
        cot = (jax.random.normal(keys[4], q.shape).astype(dtype), jax.random.normal(keys[5], s0.shape))
        up = [x.astype(jnp.float32) for x in (q, k, v)]
        for segments in (None, seg):
            g_ours, (o_ours, f_ours) = _gradients(lightning_attention_triton, q, k, v, s0, decay, segments, *cot)
            g_ref, (o_ref, f_ref) = _gradients(lightning_attention_reference, *up, s0, decay, segments, *cot)
            errs = dict(out=rel_err(o_ours, o_ref), final_state=rel_err(f_ours, f_ref))
            for name, ours, ref in zip(["dq", "dk", "dv", "ds0"], g_ours, g_ref, strict=True):
                errs[name] = rel_err(ours, ref)
            ok = all(e <= tol for e in errs.values())
            lines.append(f"check {jnp.dtype(dtype).name} segments={segments is not None}: "
                         + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + (" OK" if ok else " FAIL"))
    q, k, v = (jax.random.normal(kk, (64, heads, dim)) for kk in keys[5:8])
    state = jax.random.normal(keys[0], (64, heads, dim, dim))
    o_ref, s_ref = lightning_decode_reference(q, k, v, rates(heads), state)
    o_ours, s_ours = lightning_decode_triton(q, k, v, rates(heads), state + 0.0)
    errs = (rel_err(o_ours, o_ref), rel_err(s_ours, s_ref))
    lines.append(f"check decode fp32: out={errs[0]:.1e} state={errs[1]:.1e} " + ("OK" if max(errs) <= 1e-5 else "FAIL"))
    return lines


def fla_ops():
    try:
        import torch
        import triton
        from fla.ops.lightning_attn import chunk_lightning_attn, fused_recurrent_lightning_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # fla-core missing: report and time JAX only
        print(f"fla unavailable: {e!r}")
        return None
    return torch, triton, chunk_simple_gla, chunk_lightning_attn, fused_recurrent_lightning_attn


def time_prefill(shape, fla, tuning) -> dict:
    batch, seq, heads, dim = shape
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
    decay = rates(heads)
    row = {}

    def fwd(fn, **kw):
        return jax.jit(lambda q, k, v: fn(q, k, v, decay, **kw))

    def fwd_bwd(fn, **kw):
        def run(q, k, v, do):
            (out, fin), pullback = jax.vjp(lambda q, k, v: fn(q, k, v, decay, **kw), q, k, v)
            return pullback((do, jnp.zeros_like(fin)))
        return jax.jit(run)

    row["ours_fwd"] = time_jax(fwd(lightning_attention_triton, **tuning), q, k, v)
    row["ours_fwdbwd"] = time_jax(fwd_bwd(lightning_attention_triton, **tuning), q, k, v, do)
    row["ref_fwd"] = time_jax(fwd(lightning_attention_reference), q, k, v)
    row["ref_fwdbwd"] = time_jax(fwd_bwd(lightning_attention_reference), q, k, v, do)
    if fla is not None:
        torch, triton, chunk_simple_gla, chunk_lightning_attn, _ = fla
        tq, tk, tv, tdo = (torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(4))
        g = (-torch.tensor(np.asarray(decay), device="cuda"))[None, None].expand(batch, seq, heads).contiguous()
        ops = {
            "simple_gla": lambda q, k, v: chunk_simple_gla(q, k, v, g=g, output_final_state=True)[0],
            "lightning": lambda q, k, v: chunk_lightning_attn(q, k, v, layer_idx=0, num_layers=12,
                                                              output_final_state=True)[0],
        }
        for name, op in ops.items():
            xs = [t.clone().requires_grad_() for t in (tq, tk, tv)]
            for mode, run in (("fwd", lambda op=op: op(tq, tk, tv)),
                              ("fwdbwd", lambda op=op, xs=xs: op(*xs).backward(tdo))):
                try:
                    row[f"fla_{name}_{mode}"] = triton.testing.do_bench(run, grad_to_none=xs, return_mode="median")
                except RuntimeError as e:  # fla refuses gated backward on Triton < 3.7.1 on Hopper (fla #640)
                    print(f"fla {name} {mode} failed: {str(e)[:120]}")
    return row


def time_decode(batch, fla) -> dict:
    heads, dim, steps = 16, 128, 10
    keys = jax.random.split(jax.random.key(2), 4)
    q, k, v = (jax.random.normal(kk, (batch, heads, dim), jnp.bfloat16) for kk in keys[:3])
    state = jax.random.normal(keys[3], (batch, heads, dim, dim), jnp.float32)
    decay = rates(heads)

    def chain(fn):  # `steps` dependent decode steps per call: amortises dispatch, as a generation loop does
        def run(state):
            return jax.lax.fori_loop(0, steps, lambda _, s: fn(q, k, v, decay, s)[1], state)
        return jax.jit(run, donate_argnums=0)

    row = {}
    for name, fn in (("ours", lightning_decode_triton), ("ref", lightning_decode_reference)):
        step = chain(fn)
        s = state + 0.0
        s = step(s)
        jax.block_until_ready(s)
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            s = step(s)
            jax.block_until_ready(s)
            samples.append((time.perf_counter() - start) / steps * 1e3)
        row[f"{name}_decode"] = statistics.median(samples)
    if fla is not None:
        torch, triton, *_, fused_recurrent_lightning_attn = fla
        tq, tk, tv = (torch.randn(batch, 1, heads, dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        ts = torch.randn(batch, heads, dim, dim, device="cuda")
        row["fla_decode"] = triton.testing.do_bench(
            lambda: fused_recurrent_lightning_attn(tq, tk, tv, layer_idx=0, num_layers=12, initial_state=ts,
                                                   output_final_state=True), return_mode="median")
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="try kernel tunings on the first shape")
    parser.add_argument("--shapes", default="", help="B,T,H,D[;B,T,H,D...] instead of the issue's three shapes")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode timings")
    parser.add_argument("--splits", type=int, default=1,
                        help="forward sequence pieces for our kernel (0: pick per shape; 1: single pass)")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    checks = [] if args.skip_check else check_gpu_kernels()
    for line in checks:
        print(line, flush=True)
    fla = fla_ops()
    tuning = {}
    if args.sweep:  # pick the fastest fwd+bwd tuning on the first shape
        q = jax.random.normal(jax.random.key(3), SHAPES[0], jnp.bfloat16)
        decay = rates(SHAPES[0][2])
        best = None
        for cand in ({}, dict(block_v=32), dict(bwd_num_warps=8), dict(block_k=32), dict(block_v=32, block_k=32)):
            def run(q, c=cand):
                return jax.grad(lambda q: lightning_attention_triton(q, q, q, decay, **c)[0].sum())(q)
            fwd_ms = time_jax(jax.jit(lambda q, c=cand: lightning_attention_triton(q, q, q, decay, **c)), q)
            ms = time_jax(jax.jit(run), q)
            print(f"sweep {cand}: fwd {fwd_ms:.3f} ms, fwd+bwd {ms:.3f} ms", flush=True)
            if best is None or ms < best[0]:
                best = (ms, cand)
        tuning = best[1]
    tuning = dict(tuning, splits=args.splits)
    print(f"tuning used: {tuning}")
    shapes = [tuple(int(x) for x in item.split(",")) for item in args.shapes.split(";")] if args.shapes else SHAPES
    rows = []
    for shape in shapes:
        row = time_prefill(shape, fla, tuning)
        rows.append((shape, row))
        print(shape, {k: round(v, 3) for k, v in row.items()}, flush=True)
    drows = []
    for batch in [] if args.no_decode else DECODE_BATCHES:
        row = time_decode(batch, fla)
        drows.append((batch, row))
        print("decode", batch, {k: round(v, 4) for k, v in row.items()}, flush=True)

    print("\n| shape B,T,H,D | mode | ours ms | ref ms | fla simple_gla ms | fla lightning ms | ours/fla | "
          "ours % HBM floor |")
    print("|---|---|---|---|---|---|---|---|")
    for (b, t, h, d), row in rows:
        for mode, floor_bytes in (("fwd", 8), ("fwdbwd", 22)):
            floor_ms = floor_bytes * b * t * h * d / HBM_BYTES_PER_S * 1e3
            fla_ms = min(row.get(f"fla_simple_gla_{mode}", np.inf), row.get(f"fla_lightning_{mode}", np.inf))
            print(f"| {b},{t},{h},{d} | {mode} | {row[f'ours_{mode}']:.3f} | {row[f'ref_{mode}']:.3f} | "
                  f"{row.get(f'fla_simple_gla_{mode}', float('nan')):.3f} | "
                  f"{row.get(f'fla_lightning_{mode}', float('nan')):.3f} | {row[f'ours_{mode}'] / fla_ms:.2f} | "
                  f"{100 * floor_ms / row[f'ours_{mode}']:.0f}% |")
    print("\n| decode B (H16 D128) | ours ms | ref ms | fla ms | ours/fla | ours % state floor |")
    print("|---|---|---|---|---|---|")
    for b, row in drows:
        floor_ms = 8 * b * 16 * 128 * 128 / HBM_BYTES_PER_S * 1e3
        fla_ms = row.get("fla_decode", float("nan"))
        print(f"| {b} | {row['ours_decode']:.4f} | {row['ref_decode']:.4f} | {fla_ms:.4f} | "
              f"{row['ours_decode'] / fla_ms:.2f} | {100 * floor_ms / row['ours_decode']:.0f}% |")
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
