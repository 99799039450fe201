"""Benchmark of hcext's Sinkhorn-Knopp op against the pure-PyTorch reference.

Variants (all fp32, the same pre-allocated inputs):
  hcext     torch.ops.hcext.sinkhorn (the C++/CUDA kernels; backward: hcext::sinkhorn_backward)
  eager     hcext.reference.sinkhorn, eager PyTorch
  compiled  torch.compile(hcext.reference.sinkhorn) (inductor, static shapes, compiled
            afresh for every shape and mode during the warm-up)
Modes: fwd (inputs without grad), fwd+bwd (inputs requiring grad; out.backward(grad) with
a fixed pre-allocated grad, accumulating into a pre-allocated .grad).
Correctness (asserted before timing): hcext's output (and in fwd+bwd its gradient) against the
reference run in float64, by the test suite's tolerance table (benchmarks/bench_mhc.py:
check_against_reference); each row's ``check`` records the largest error as a fraction of the
allowed one.

Usage, from the repository root:
  python -m benchmarks.bench_sinkhorn [--device cpu|cuda] [--quick] [--repeats N]
                                      [--threads N] [--no-compile] [--out PATH]
                                      [--tokens T ...] [--n N ...] [--max-time S]
(``python benchmarks/bench_sinkhorn.py`` works too.) Prints a markdown table and writes
JSON to benchmarks/results/sinkhorn-<device>.json (--quick: only with --out).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hcext  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.bench_mhc import check_against_reference  # noqa: E402

TOKENS = (4096, 65536)
NS = (4, 8, 16)
ITERS = 20
EPS = 1e-6
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("hcext", "eager", "compiled")


def _hcext_sinkhorn(x, iters, eps):
    return torch.ops.hcext.sinkhorn(x, iters, eps)


def _make_variants(x, grad, mode, with_compile):
    """{name: zero-argument callable} for one shape and mode."""
    fns = {"hcext": _hcext_sinkhorn, "eager": hcext.reference.sinkhorn}
    if with_compile:
        # A fresh compile per shape and mode: no recompile-limit fallbacks, no dynamic shapes.
        torch._dynamo.reset()
        fns["compiled"] = torch.compile(hcext.reference.sinkhorn, dynamic=False)
    if mode == "fwd":
        return {name: (lambda f=f: f(x, ITERS, EPS)) for name, f in fns.items()}
    leaf = x.detach().clone().requires_grad_(True)
    leaf.grad = torch.zeros_like(leaf)  # backward accumulates into it in place: no new buffer

    def fwd_bwd(f):
        return lambda: f(leaf, ITERS, EPS).backward(grad)

    return {name: fwd_bwd(f) for name, f in fns.items()}


def run(device, tokens, ns, modes, repeats, warmup, with_compile, max_time_s=None, log=print):
    """Times every (T, n, mode); returns a list of result dicts."""
    results = []
    for T in tokens:
        for n in ns:
            gen = torch.Generator().manual_seed(1234 + T + n)
            x = torch.randn(T, n, n, generator=gen).mul_(2).to(device)
            grad = torch.randn(T, n, n, generator=gen).to(device)
            for mode in modes:
                # Before timing: hcext's Sinkhorn (and in fwd+bwd its gradient) against the reference.
                check = check_against_reference(
                    lambda t: _hcext_sinkhorn(t, ITERS, EPS), lambda t: hcext.reference.sinkhorn(t, ITERS, EPS), [x],
                    None if mode == "fwd" else [grad], f"sinkhorn T={T} n={n} {mode}")
                variants = _make_variants(x, grad, mode, with_compile)
                timings = harness.time_interleaved(
                    variants,
                    device,
                    repeats=repeats,
                    warmup=warmup,
                    min_sample_ms=0.5 if device.type == "cuda" else 0.0,  # CUDA: calls of a few us
                    max_time_s=max_time_s,
                )
                row = {"tokens": T, "n": n, "mode": mode, "iters": ITERS, "dtype": "float32", "check": check}
                row["timings"] = {name: t.summary() for name, t in timings.items()}
                for base in ("eager", "compiled"):
                    if base in timings:
                        row[f"speedup_vs_{base}"] = harness.speedup(timings[base], timings["hcext"])
                        row[f"speedup_vs_{base}_min"] = harness.speedup(timings[base], timings["hcext"], "min")
                row["_timings"] = timings
                results.append(row)
                log(
                    f"T={T:6d} n={n:2d} {mode:8s} "
                    + "  ".join(f"{name} {harness.fmt_ms(t)}" for name, t in timings.items())
                )
    return results


def table(results, with_compile):
    variants = [v for v in VARIANTS if with_compile or v != "compiled"]
    ratios = [("hcext vs eager", "eager", "hcext")]
    if with_compile:
        ratios.append(("hcext vs compiled", "compiled", "hcext"))
    rows = [((str(r["tokens"]), str(r["n"]), r["mode"]), r["_timings"]) for r in results]
    return harness.markdown_table(rows, ("T", "n", "mode"), variants, ratios)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: T=64, n=4, 2 repeats, no torch.compile")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: os.cpu_count())")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sinkhorn-<device>.json)")
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help=f"token counts (default {TOKENS})")
    p.add_argument("--n", type=int, nargs="+", default=list(NS), help=f"matrix sizes n (default {NS})")
    p.add_argument("--max-time", type=float, default=120.0,
                   help="seconds of timed rounds per case before stopping early (at least 3 rounds; default 120)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    threads = harness.set_threads(args.threads)
    tokens, ns, modes, repeats, warmup = tuple(args.tokens), tuple(args.n), MODES, args.repeats, args.warmup
    with_compile = not args.no_compile
    if args.quick:
        tokens, ns, repeats, warmup, with_compile = (64,), (4,), 2, 1, False

    meta = harness.metadata(device, threads)
    print(f"# sinkhorn benchmark: {meta['device_name']}, {threads} threads, torch {meta['torch_version']}, "
          f"iters={ITERS}, fp32, {repeats} interleaved repeats; times: median (min) ms")
    results = run(device, tokens, ns, modes, repeats, warmup, with_compile, args.max_time)
    print()
    print(table(results, with_compile))

    out = args.out
    if out is None and not args.quick:
        out = os.path.join(harness.RESULTS_DIR, f"sinkhorn-{device.type}.json")
    if out:
        config = {"benchmark": "sinkhorn", "iters": ITERS, "eps": EPS, "repeats": repeats, "warmup": warmup,
                  "max_time_s": args.max_time, "variants": [v for v in VARIANTS if with_compile or v != "compiled"],
                  "quick": args.quick}
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        meta["loadavg_end"] = harness.loadavg()  # the machine may be shared: how busy it was
        harness.write_json(out, meta, clean, config=config)
        print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
