"""The mHC projection's FLOP rate against a square sgemm, in the same run.

    python -m benchmarks.bench_projection [--threads N] [--repeats R] [--quick] [--out PATH]

For x [T, n, C] (T = 4096, n = 4, C in {1024, 2560}, fp32 and bf16) and phi [n*C, D], D = 24:
  forward   torch.ops.hcext.mhc_coeffs_fwd: the projection pass (2 T n C D FLOPs: proj = x̃ @ phi,
            with the sum of squares) plus the per-token epilogue (20 Sinkhorn iterations, timed
            with it: the rate is a lower bound for the pass alone)
  backward  torch.ops.hcext.mhc_backward without a layer-input gradient: the pass that writes
            grad_x and grad_phi (4 T n C D FLOPs: dproj @ phiᵀ and x̃ᵀ @ dproj) plus the
            epilogue's backward and the fresh grad_x allocation (its page faults included, as
            any caller pays them)
  sgemm     torch.mm of two 2048 x 2048 fp32 matrices (2 * 2048³ FLOPs), the machine's GEMM rate
Variants are interleaved (round robin), min and median of the repeats; before timing, each
shape's proj is checked against x̃ @ φ in fp64 (``check``: the largest error as a fraction of
the fp32 tolerance). Writes benchmarks/results/projection-cpu.json (--out: elsewhere); --quick:
T=64, C=64, a 256² sgemm, 2 repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

import hcext  # noqa: F401
from benchmarks import harness

N, TOKENS, CHANNELS = 4, 4096, (1024, 2560)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/projection-cpu.json)")
    a = p.parse_args(argv)
    tokens, channels, square = (64, (64,), 256) if a.quick else (TOKENS, CHANNELS, 2048)
    repeats = 2 if a.quick else a.repeats
    threads = harness.set_threads(a.threads)
    meta = harness.metadata(torch.device("cpu"), threads)
    D = N * N + 2 * N
    A = torch.randn(square, square)
    B = torch.randn(square, square)
    sgemm = f"sgemm {square}"
    cases = {sgemm: (lambda: torch.mm(A, B), 2 * square**3)}
    checks = {}
    for C in channels:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, N, C).to(dtype)
            phi = torch.randn(N * C, D) / math.sqrt(N * C)
            alpha, bias = torch.full((3,), 0.5), torch.randn(D) * 0.5
            scal = (20, 1e-6, 1e-6, 1e-6, 2.0)
            out = torch.ops.hcext.mhc_coeffs_fwd(x, phi, alpha, bias, *scal)
            g = [torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2])]
            flops = 2 * tokens * N * C * D
            tag = f"C={C} {str(dtype)[6:]}"
            want = x.double().reshape(tokens, N * C) @ phi.double()
            err = (out[3].double() - want).abs() - 1e-4 * want.abs()
            checks[tag] = float(err.max()) / (2e-5 * max(1.0, float(want.abs().max())))
            cases[f"forward {tag}"] = (
                lambda x=x, phi=phi, alpha=alpha, bias=bias: torch.ops.hcext.mhc_coeffs_fwd(x, phi, alpha, bias, *scal),
                flops)
            cases[f"backward {tag}"] = (
                lambda x=x, phi=phi, alpha=alpha, bias=bias, out=out, g=g: torch.ops.hcext.mhc_backward(
                    x, phi, alpha, bias, out[3], out[4], None, g[0], g[1], g[2], 20, 1e-6, 1e-6, 2.0),
                2 * flops)
    for fn, _ in cases.values():
        fn()
        fn()
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, (fn, _) in cases.items():
            times[k].append(_time(fn))
    sgemm_rate = cases[sgemm][1] / min(times[sgemm])
    rows = []
    print(f"# projection FLOP rate, {meta['device_name']}, {threads} threads, {repeats} interleaved repeats")
    print("| case | min (ms) | median (ms) | GFLOP/s (min) | of sgemm |")
    print("|---|---|---|---|---|")
    for k, (fn, flops) in cases.items():
        rate = flops / min(times[k])
        tag = k.split(" ", 1)[1]
        rows.append({"case": k, "min_ms": 1e3 * min(times[k]), "median_ms": 1e3 * statistics.median(times[k]),
                     "gflops": rate / 1e9, "of_sgemm": rate / sgemm_rate,
                     "check": checks.get(tag, 0.0) if k != sgemm else 0.0})
        r = rows[-1]
        print(f"| {k} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | {r['gflops']:.0f} | {r['of_sgemm']:.2f} |")
    out_path = a.out or os.path.join(harness.RESULTS_DIR, "projection-cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"metadata": meta, "config": {"benchmark": "projection", "repeats": repeats, "quick": a.quick},
                   "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
