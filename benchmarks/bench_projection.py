"""The mHC projection's FLOP rate against a square sgemm, in the same run.

    python -m benchmarks.bench_projection [--threads N] [--repeats R]

For x [T, n, C] (T = 4096, n = 4, C in {1024, 2560}, fp32 and bf16) and phi [n*C, D], D = 24:
  forward   torch.ops.hcext.mhc_coeffs_fwd: the projection pass (2 T n C D FLOPs: proj = x̃ @ phi,
            with the sum of squares) plus the per-token epilogue (20 Sinkhorn iterations, timed
            with it: the rate is a lower bound for the pass alone)
  backward  torch.ops.hcext.mhc_backward without a layer-input gradient: the pass that writes
            grad_x and grad_phi (4 T n C D FLOPs: dproj @ phiᵀ and x̃ᵀ @ dproj) plus the
            epilogue's backward and the fresh grad_x allocation (its page faults included, as
            any caller pays them)
  sgemm     torch.mm of two 2048 x 2048 fp32 matrices (2 * 2048³ FLOPs), the machine's GEMM rate
Variants are interleaved (round robin), min and median of the repeats; writes
benchmarks/results/projection-cpu.json.
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
    a = p.parse_args(argv)
    threads = harness.set_threads(a.threads)
    meta = harness.metadata(torch.device("cpu"), threads)
    D = N * N + 2 * N
    A = torch.randn(2048, 2048)
    B = torch.randn(2048, 2048)
    cases = {"sgemm 2048": (lambda: torch.mm(A, B), 2 * 2048**3)}
    for C in CHANNELS:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(TOKENS, N, C).to(dtype)
            phi = torch.randn(N * C, D) / math.sqrt(N * C)
            alpha, bias = torch.full((3,), 0.5), torch.randn(D) * 0.5
            scal = (20, 1e-6, 1e-6, 1e-6, 2.0)
            out = torch.ops.hcext.mhc_coeffs_fwd(x, phi, alpha, bias, *scal)
            g = [torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2])]
            flops = 2 * TOKENS * N * C * D
            tag = f"C={C} {str(dtype)[6:]}"
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
    for _ in range(a.repeats):
        for k, (fn, _) in cases.items():
            times[k].append(_time(fn))
    sgemm_rate = cases["sgemm 2048"][1] / min(times["sgemm 2048"])
    rows = []
    print(f"# projection FLOP rate, {meta['device_name']}, {threads} threads, {a.repeats} interleaved repeats")
    print("| case | min (ms) | median (ms) | GFLOP/s (min) | of sgemm |")
    print("|---|---|---|---|---|")
    for k, (fn, flops) in cases.items():
        rate = flops / min(times[k])
        rows.append({"case": k, "min_ms": 1e3 * min(times[k]), "median_ms": 1e3 * statistics.median(times[k]),
                     "gflops": rate / 1e9, "of_sgemm": rate / sgemm_rate})
        r = rows[-1]
        print(f"| {k} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | {r['gflops']:.0f} | {r['of_sgemm']:.2f} |")
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    with open(os.path.join(harness.RESULTS_DIR, "projection-cpu.json"), "w") as f:
        json.dump({"metadata": meta, "config": {"benchmark": "projection", "repeats": a.repeats}, "results": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
