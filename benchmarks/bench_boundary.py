"""Benchmark of the mHC layer boundary: layer l's residual merge followed by layer l+1's
coefficients and layer input, fused (hcext::mhc_post_pre) against unfused hcext ops and the
pure-PyTorch reference (eager and torch.compile).

For streams x [T, n, C], layer l's branch output f [T, C] and coefficients h_post [T, n],
h_res [T, n, n], and layer l+1's parameters (phi, alpha, bias):

  fused     hcext.ops.mhc_post_pre(f, x, h_post, h_res, phi, alpha, bias)
  unfused   x_next = hcext.ops.stream_mix_expand(f, x, h_post, h_res); hcext.ops.mhc_pre(x_next, ...)
  eager     hcext.reference.mhc_post_pre (the same composition in plain PyTorch)
  compiled  torch.compile(hcext.reference.mhc_post_pre)

all returning (x_next, layer_input, h_post_next, h_res_next); fwd+bwd takes the gradients of
the four outputs (fixed, pre-allocated) with respect to every input (torch.autograd.grad).
n = 4, 20 Sinkhorn iterations, post_mult 2. Before timing, fused and unfused are asserted to
match the reference run in float64 (outputs and, in fwd+bwd, every gradient), by the test
suite's tolerance table (benchmarks/bench_mhc.py: check_against_reference; each row's
``check`` records the largest error as a fraction of the allowed one). The fused op saves one read of x_next (the
statistics of the next layer's RMS norm come out of the pass that writes it) and, in
backward, sums x_next's two gradients in fp32 inside the coefficient backward instead of an
extra elementwise add.

Usage, from the repository root:
  python -m benchmarks.bench_boundary [--device cpu|cuda] [--quick] [--repeats N] [--warmup N]
                                      [--threads N] [--no-compile] [--out PATH]
Writes JSON to benchmarks/results/boundary-<device>.json (--quick: only with --out).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hcext  # noqa: E402,F401  (loads the native library: torch.ops.hcext.*)
from benchmarks import harness  # noqa: E402
from benchmarks.bench_mhc import check_against_reference  # noqa: E402
from hcext import ops, reference  # noqa: E402
from hcext.nn import mhc_bias_init  # noqa: E402

N = 4
ITERS = 20
POST_MULT = 2.0
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("fused", "unfused", "eager", "compiled")


def fused(f, x, h_post, h_res, phi, alpha, bias):
    return ops.mhc_post_pre(f, x, h_post, h_res, phi, alpha, bias, ITERS, post_mult=POST_MULT)


def unfused(f, x, h_post, h_res, phi, alpha, bias):
    x_next = ops.stream_mix_expand(f, x, h_post, h_res)
    return (x_next, *ops.mhc_pre(x_next, phi, alpha, bias, ITERS, post_mult=POST_MULT))


def eager(f, x, h_post, h_res, phi, alpha, bias):
    return reference.mhc_post_pre(f, x, h_post, h_res, phi, alpha, bias, ITERS, post_mult=POST_MULT)


def make_inputs(T, C, dtype, device, seed=0):
    """Layer l's state and layer l+1's parameters (paper-like scales), and the four incoming gradients."""
    gen = torch.Generator().manual_seed(seed)
    n, D = N, N * N + 2 * N
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = rand(T, n, C).to(device, dtype)
    f = rand(T, C).to(device, dtype)
    h_post = (2 * torch.rand(T, n, generator=gen)).to(device)
    h_res = reference.sinkhorn(rand(T, n, n), ITERS).to(device)
    phi = (rand(n * C, D) / math.sqrt(n * C)).to(device)
    alpha = torch.full((3,), 0.01, device=device)
    bias = (mhc_bias_init(n) + 0.1 * rand(D)).to(device)
    grads = (rand(T, n, C).to(device, dtype), rand(T, C).to(device, dtype), rand(T, n).to(device),
             rand(T, n, n).to(device))
    return [f, x, h_post, h_res, phi, alpha, bias], grads


def configs(device, quick):
    if quick:
        return [(64, 64, torch.float32)]
    shapes = [(4096, C, dt) for dt in (torch.float32, torch.bfloat16) for C in (1024, 2560)]
    if device.type == "cuda":
        shapes.append((16384, 4096, torch.bfloat16))
    return shapes


def run_config(T, C, dtype, device, repeats, warmup, with_compile, log=print) -> List[dict]:
    inputs, grads = make_inputs(T, C, dtype, device, seed=T + C)
    sync_kw = dict(repeats=repeats, warmup=warmup, min_sample_ms=0.5 if device.type == "cuda" else 0.0)
    key = {"tokens": T, "n": N, "C": C, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for mode in MODES:
        # Before timing: both hcext variants against the reference (outputs and, in fwd+bwd, every gradient).
        g = None if mode == "fwd" else grads
        check = {name: check_against_reference(fn, eager, inputs, g, f"boundary {name} T={T} C={C} {dtype} {mode}")
                 for name, fn in (("fused", fused), ("unfused", unfused))}
        fns = {"fused": fused, "unfused": unfused, "eager": eager}
        if with_compile:
            torch._dynamo.reset()
            fns["compiled"] = torch.compile(eager, dynamic=False)
        calls = {}
        for name, fn in fns.items():
            if mode == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(*inputs)
            else:
                leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

                def call(fn=fn, leaves=leaves):
                    return torch.autograd.grad(fn(*leaves), leaves, grads)
            calls[name] = call
        timings = harness.time_interleaved(calls, device, **sync_kw)
        row = {**key, "mode": mode, "sinkhorn_iters": ITERS, "post_mult": POST_MULT, "check": check,
               "timings": {name: t.summary() for name, t in timings.items()}}
        for base in ("unfused", "eager", "compiled"):
            if base in timings:
                row[f"speedup_vs_{base}"] = harness.speedup(timings[base], timings["fused"])
                row[f"speedup_vs_{base}_min"] = harness.speedup(timings[base], timings["fused"], "min")
        row["_timings"] = timings
        rows.append(row)
        log(f"T={T} C={C} {key['dtype']:8s} {mode:8s} "
            + "  ".join(f"{name} {harness.fmt_ms(t)}" for name, t in timings.items()))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: T=64, C=64, fp32, 2 repeats, no compile")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: os.cpu_count())")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/boundary-<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    threads = harness.set_threads(args.threads)
    repeats, warmup, with_compile = args.repeats, args.warmup, not args.no_compile
    if args.quick:
        repeats, warmup, with_compile = 2, 1, False
    variants = [v for v in VARIANTS if with_compile or v != "compiled"]
    meta = harness.metadata(device, threads)
    meta["loadavg_start"] = os.getloadavg()
    print(f"# mHC layer boundary benchmark: {meta['device_name']}, {threads} threads, torch {meta['torch_version']}, "
          f"n={N}, {ITERS} Sinkhorn iterations, {repeats} interleaved repeats; times: median (min) ms")
    results = []
    for T, C, dtype in configs(device, args.quick):
        results += run_config(T, C, dtype, device, repeats, warmup, with_compile)
    meta["loadavg_end"] = os.getloadavg()
    table_rows = [((str(r["tokens"]), str(r["C"]), r["dtype"], r["mode"]), r["_timings"]) for r in results]
    ratios = [("fused vs " + b, b, "fused") for b in variants if b != "fused"]
    print()
    print(harness.markdown_table(table_rows, ("T", "C", "dtype", "mode"), variants, ratios))
    out = args.out
    if out is None and not args.quick:
        out = os.path.join(harness.RESULTS_DIR, f"boundary-{device.type}.json")
    if out:
        config = {"benchmark": "boundary", "n": N, "sinkhorn_iters": ITERS, "post_mult": POST_MULT,
                  "repeats": repeats, "warmup": warmup, "variants": variants, "quick": args.quick,
                  "gradients": "torch.autograd.grad of all four outputs w.r.t. every input"}
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        harness.write_json(out, meta, clean, config=config)
        print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
