"""Benchmark of hcext's stream ops, stream_aggregate and stream_mix_expand, against the pure-
PyTorch reference (eager and torch.compile'd), with the achieved bandwidth measured against a
same-size copy.

The ops, for streams x [T, n, C] with per-token fp32 coefficients (mHC's case; the
coefficients are fixed inputs here, their computation is not timed):

    aggregate   y = stream_aggregate(x, h_pre)                 y[t, c] = sum_i h_pre[t, i] x[t, i, c]
    mix_expand  out = stream_mix_expand(f, x, h_post, h_res)   out[t, i, c] = sum_j h_res[t, i, j] x[t, j, c]
                                                                              + h_post[t, i] f[t, c]

Variants (the same pre-allocated inputs):
  hcext     hcext.ops.stream_aggregate / hcext.ops.stream_mix_expand (the C++/CUDA kernels)
  eager     hcext.reference.stream_aggregate / stream_mix_expand, eager PyTorch
  compiled  torch.compile of that reference op (inductor, static shapes, compiled afresh for
            every shape, op and mode during the warm-up)
  copy      dst.copy_(x) into a pre-allocated dst of x's size and dtype: the bandwidth yardstick
            (the same line as bench_mhc's), timed in the same interleaved rounds
Modes:
  fwd       under torch.no_grad
  fwd+bwd   forward with every input requiring grad, then torch.autograd.grad(out, inputs, g)
            with a pre-allocated incoming gradient g (gradients returned, not accumulated)
Before timing, each shape's hcext outputs (and, in fwd+bwd, gradients) are checked against the
eager reference's (an assertion; the JSON records the largest difference).

Bytes each op must move (s = bytes per element of x's dtype; per token; the coefficients,
O(n^2) per token, are negligible and not counted):
  aggregate   fwd: read x (n*C), write y (C)                                    (n + 1) * C * s
              fwd+bwd: fwd, plus read g (C) and x again (n*C: grad_h_pre needs it), write
              grad_x (n*C)                                                      (3n + 2) * C * s
  mix_expand  fwd: read x (n*C) and f (C), write out (n*C)                      (2n + 1) * C * s
              fwd+bwd: fwd, plus read g (n*C), x again (n*C: grad_h_res) and f again (C:
              grad_h_post), write grad_x (n*C) and grad_f (C)                   (5n + 3) * C * s
The copy moves 2 * |x| bytes (read + write); "of copy" is (bytes must-move / op time) /
(2 * |x| / copy time), with medians (and, in the JSON, mins) of both.

Usage, from the repository root:
  python -m benchmarks.bench_streams [--device cpu|cuda] [--quick] [--repeats N] [--warmup N]
                                     [--threads N] [--no-compile] [--out PATH]
                                     [--tokens T] [--channels C ...] [--dtypes D ...]
Prints a markdown table and writes JSON to benchmarks/results/streams-<device>.json (--quick:
only with --out).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hcext  # noqa: E402,F401  (loads the native library: torch.ops.hcext.*)
from benchmarks import harness  # noqa: E402
from benchmarks.bench_mhc import bandwidth_stats, compile_fresh, copy_callable, speedups  # noqa: E402
from benchmarks.bench_mhc import check_against_reference as check_against_table  # noqa: E402
from hcext import ops, reference  # noqa: E402

N = 4
TOKENS = 4096
CHANNELS = (1024, 2560)
DTYPES = ("float32", "bfloat16")
OPS = ("aggregate", "mix_expand")
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("hcext", "eager", "compiled")
# Largest |hcext - reference| allowed before timing, relative to max(1, max |reference|): both
# compute in fp32; bf16 outputs are one rounding of equal fp32 values (plus headroom).
CHECK_TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}

# op -> (hcext function, reference function, names of its inputs among make_inputs' tensors)
FUNCTIONS: Dict[str, Tuple[Callable, Callable, Tuple[str, ...]]] = {
    "aggregate": (ops.stream_aggregate, reference.stream_aggregate, ("x", "h_pre")),
    "mix_expand": (ops.stream_mix_expand, reference.stream_mix_expand, ("f", "x", "h_post", "h_res")),
}


def bytes_must_move(tokens: int, n: int, C: int, itemsize: int, op: str, mode: str) -> int:
    """Bytes an op must move (see the module docstring)."""
    per_token = {
        ("aggregate", "fwd"): n + 1,
        ("aggregate", "fwd+bwd"): 3 * n + 2,
        ("mix_expand", "fwd"): 2 * n + 1,
        ("mix_expand", "fwd+bwd"): 5 * n + 3,
    }[(op, mode)]
    return tokens * per_token * C * itemsize


def make_inputs(T: int, C: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Streams x and branch output f in ``dtype``, per-token fp32 coefficients (h_pre in (0, 1),
    h_post in (0, 2), h_res doubly stochastic as mHC makes it), and the incoming gradients of
    both ops' outputs."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    n = N
    t = {
        "x": rand(T, n, C).to(device, dtype),
        "f": rand(T, C).to(device, dtype),
        "h_pre": torch.sigmoid(rand(T, n)).to(device),
        "h_post": (2 * torch.sigmoid(rand(T, n))).to(device),
        "h_res": reference.sinkhorn(rand(T, n, n), 20).to(device),
        "g_aggregate": rand(T, C).to(device, dtype),
        "g_mix_expand": rand(T, n, C).to(device, dtype),
    }
    return t


def _leaves(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def check_against_reference(op: str, inputs: Dict[str, torch.Tensor], mode: str) -> float:
    """hcext's output (and in fwd+bwd its gradients, for the same incoming gradient) against the
    eager reference's; asserts they agree within CHECK_TOL and returns the largest difference
    relative to max(1, max |reference|)."""
    fn, ref, names = FUNCTIONS[op]
    dtype = str(inputs["x"].dtype).replace("torch.", "")
    worst = 0.0
    results = []
    for f in (fn, ref):
        if mode == "fwd":
            with torch.no_grad():
                results.append([f(*[inputs[k] for k in names])])
        else:
            leaves = _leaves([inputs[k] for k in names])
            out = f(*leaves)
            results.append([out.detach(), *torch.autograd.grad(out, leaves, inputs[f"g_{op}"])])
    for got, want in zip(*results):
        assert got.shape == want.shape and got.dtype == want.dtype, (op, mode, got.shape, want.shape)
        diff = (got.double() - want.double()).abs().max().item() / max(1.0, want.abs().max().item())
        worst = max(worst, diff)
    assert worst <= CHECK_TOL[dtype], f"{op} {mode} {dtype}: hcext differs from the reference by {worst:.3e}"
    return worst


def callables(op: str, inputs: Dict[str, torch.Tensor], mode: str,
              with_compile: bool) -> Dict[str, Callable[[], object]]:
    """Zero-argument callables of every variant for one op and mode."""
    fn, ref, names = FUNCTIONS[op]
    fns = {"hcext": fn, "eager": ref}
    if with_compile:
        fns["compiled"] = compile_fresh(ref)
    args = [inputs[k] for k in names]
    calls = {}
    if mode == "fwd":
        for name, f in fns.items():
            def call(f=f):
                with torch.no_grad():
                    return f(*args)
            calls[name] = call
    else:
        leaves = _leaves(args)
        grad = inputs[f"g_{op}"]
        for name, f in fns.items():
            calls[name] = lambda f=f: torch.autograd.grad(f(*leaves), leaves, grad)
    return calls


def run_config(T: int, C: int, dtype: torch.dtype, device: torch.device, modes, repeats, warmup, with_compile,
               log=print) -> List[dict]:
    """Times both ops in every mode for one shape."""
    inputs = make_inputs(T, C, dtype, device, seed=T + C)
    x = inputs["x"]
    copy, copy_bytes = copy_callable(x)
    sync_kw = dict(repeats=repeats, warmup=warmup, min_sample_ms=0.5 if device.type == "cuda" else 0.0)
    key = {"tokens": T, "n": N, "C": C, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for op in OPS:
        for mode in modes:
            max_diff = check_against_reference(op, inputs, mode)
            # And against the reference in float64, by the test suite's tolerance table.
            fn, ref, names = FUNCTIONS[op]
            check = check_against_table(fn, ref, [inputs[k] for k in names],
                                        None if mode == "fwd" else [inputs[f"g_{op}"]], f"{op} T={T} C={C} {mode}")
            calls = callables(op, inputs, mode, with_compile)
            calls["copy"] = copy
            timings = harness.time_interleaved(calls, device, **sync_kw)
            row = {**key, "op": op, "mode": mode, "timings": {name: t.summary() for name, t in timings.items()}}
            speedups(row, timings)
            row["max_rel_diff_vs_reference"] = max_diff
            row["check"] = check
            row["bytes_must_move"] = bytes_must_move(T, N, C, x.element_size(), op, mode)
            row["copy_bytes"] = copy_bytes
            row["bandwidth"] = bandwidth_stats(row["bytes_must_move"], timings["hcext"], copy_bytes, timings["copy"])
            row["_timings"] = timings
            rows.append(row)
            bw = row["bandwidth"]
            log(f"T={T} C={C} {key['dtype']:8s} {op:10s} {mode:8s} "
                + "  ".join(f"{name} {harness.fmt_ms(t)}" for name, t in timings.items())
                + f"  hcext {bw['gbps']:.1f} GB/s = {bw['fraction_of_copy']:.2f} of copy")
            del calls
    return rows


def table(results: List[dict], variants: Sequence[str]) -> str:
    """'median (min)' ms per variant, the copy, hcext's speed-ups, and bytes moved vs time."""
    header = ["T", "C", "dtype", "op", "mode"] + [f"{v} ms" for v in variants] + ["copy ms"]
    header += [f"hcext vs {b}" for b in variants if b != "hcext"]
    header += ["MB moved", "hcext GB/s", "copy GB/s", "of copy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        t, bw = r["_timings"], r["bandwidth"]
        cells = [str(r["tokens"]), str(r["C"]), r["dtype"], r["op"], r["mode"]]
        cells += [harness.fmt_ms(t.get(v)) for v in variants] + [harness.fmt_ms(t["copy"])]
        for b in variants:
            if b != "hcext":
                cells.append(f"{r[f'speedup_vs_{b}']:.1f}x ({r[f'speedup_vs_{b}_min']:.1f}x)"
                             if f"speedup_vs_{b}" in r else "-")
        cells += [f"{r['bytes_must_move'] / 1e6:.1f}", f"{bw['gbps']:.1f}", f"{bw['copy_gbps']:.1f}",
                  f"{bw['fraction_of_copy']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configs(tokens: int, channels: Sequence[int], dtypes: Sequence[str], quick: bool):
    if quick:
        return [(64, 64, torch.float32)]
    return [(tokens, C, getattr(torch, d)) for d in dtypes for C in channels]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: T=64, C=64, fp32, 2 repeats, no torch.compile")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: os.cpu_count())")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/streams-<device>.json)")
    p.add_argument("--tokens", type=int, default=TOKENS, help=f"token count T (default {TOKENS})")
    p.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help=f"widths C (default {CHANNELS})")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=("float32", "bfloat16", "float16"),
                   help=f"stream dtypes (default {DTYPES})")
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
    print(f"# stream ops benchmark: {meta['device_name']}, {threads} threads, torch {meta['torch_version']}, "
          f"n={N}, per-token coefficients, {repeats} interleaved repeats; times: median (min) ms")
    results = []
    for T, C, dtype in configs(args.tokens, args.channels, args.dtypes, args.quick):
        results += run_config(T, C, dtype, device, MODES, repeats, warmup, with_compile)
    meta["loadavg_end"] = harness.loadavg()  # the machine may be shared: how busy it was
    print()
    print(table(results, variants))

    out = args.out
    if out is None and not args.quick:
        out = os.path.join(harness.RESULTS_DIR, f"streams-{device.type}.json")
    if out:
        config = {"benchmark": "streams", "n": N, "coefficients": "per token, fp32", "repeats": repeats,
                  "warmup": warmup, "variants": variants, "quick": args.quick, "check_tol": CHECK_TOL,
                  "gradients": "torch.autograd.grad (no .grad accumulation)"}
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        harness.write_json(out, meta, clean, config=config)
        print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
