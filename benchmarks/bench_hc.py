"""Benchmark of a whole Hyper-Connections sub-layer (HC, arXiv 2409.19606; branch excluded),
dynamic and static, on hcext against the pure-PyTorch reference and against the
``hyper-connections`` package (PyPI), with the achieved bandwidth against a same-size copy.

The sub-layer, for streams x [T, n, C] and a pre-allocated f [T, C] standing for the branch
output (the branch itself is not timed):

    h_pre, h_post, h_res = hc_coeffs(x, **params)          # dynamic: rms norm + tanh, as the paper
    layer_input = stream_aggregate(x, h_pre)
    out = stream_mix_expand(f, x, h_post, h_res)

Kinds: "dynamic" (static_alpha, static_beta, dynamic_alpha, dynamic_beta, the two scales and
the norm weight) and "static" (static_alpha and static_beta only: coefficients shared by every
token, no per-token coefficient work).

Variants (the same pre-allocated inputs):
  hcext     hcext.ops.hc_coeffs + stream_aggregate + stream_mix_expand (the C++/CUDA kernels)
  eager     the same three functions from hcext.reference, eager PyTorch
  compiled  torch.compile of that reference sub-layer (inductor, static shapes, compiled
            afresh for every shape, kind and mode during the warm-up)
  package   hyper_connections.HyperConnections(n, dim=C, layer_index=1, tanh=True) (version in
            the JSON) in its (branch_input, add_residual) mode: ``branch_input, add =
            module(x_folded); out = add(f)``. Its layout folds the streams into the batch
            dimension, ``(b s) d`` with the streams innermost, which is x's memory viewed as
            [T*n, C] (what its ``expand`` helper makes from [T, C]); no copy is needed. Its
            parameters are set to the benchmark's values, so it computes the same sub-layer up
            to details: its RMSNorm is ``F.normalize(x) * sqrt(C) * (gamma + 1)`` (no eps inside
            the root, gamma stored as weight - 1), it runs in x's dtype throughout (for bf16 the
            module is cast to bf16: bf16 coefficient math, where hcext and the reference use
            fp32), and the depth connection is an einsum plus an add rather than one fused
            merge. The JSON records the largest difference of its fp32 outputs from hcext's.
            The package has no static-HC mode (its dynamic weights are always applied), so it
            runs only in the dynamic rows.
  copy      dst.copy_(x) into a pre-allocated dst: the bandwidth yardstick, interleaved with the rest
Modes: fwd (torch.no_grad) and fwd+bwd (torch.autograd.grad of (layer_input, out) with
pre-allocated incoming gradients, with respect to x, f and every parameter; nothing is
accumulated into .grad).
Correctness (asserted before timing): hcext's sub-layer (outputs and, in fwd+bwd, the gradients of
x, f and every parameter) against the eager reference run in float64, by the test suite's
tolerance table (benchmarks/bench_mhc.py: check_against_reference); each row's ``check``
records the largest error as a fraction of the allowed one.
Bytes the sub-layer must move: as for the mHC sub-layer (see benchmarks/bench_mhc.py): fwd
(2n + 2) * C * s per token, fwd+bwd (5n + 5) * C * s, s = bytes per element of x's dtype.

Usage, from the repository root:
  python -m benchmarks.bench_hc [--device cpu|cuda] [--quick] [--repeats N] [--warmup N]
                                [--threads N] [--channels 1024 2560] [--dtypes float32 bfloat16]
                                [--no-compile] [--no-package] [--out PATH]
Prints markdown tables and writes JSON to benchmarks/results/hc-<device>.json (--quick: only
with --out).
"""

from __future__ import annotations

import argparse
import copy as copy_module
import os
import sys
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hcext  # noqa: E402,F401  (loads the native library: torch.ops.hcext.*)
from benchmarks import harness  # noqa: E402
from benchmarks.bench_mhc import (  # noqa: E402
    bandwidth_stats,
    bytes_must_move,
    check_against_reference,
    compile_fresh,
    copy_callable,
    speedups,
    sublayer_callables,
)
from hcext import init as hc_init  # noqa: E402
from hcext import ops, reference  # noqa: E402

N = 4
TOKENS = 4096
CHANNELS = (1024, 2560)
DTYPES = ("float32", "bfloat16")
KINDS = ("dynamic", "static")
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("hcext", "eager", "compiled", "package")
LAYER_INDEX = 1
NORM = "rms"
USE_TANH = True


def _package_version() -> Optional[str]:
    try:
        import importlib.metadata

        return importlib.metadata.version("hyper-connections")
    except Exception:  # not installed
        return None


def make_params(kind: str, C: int, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """HC parameters (fp32) at the paper's initialisation plus noise, so that no coefficient
    is trivially 0 or 1 (the timings do not depend on the values)."""
    gen = torch.Generator().manual_seed(seed)
    params = hc_init.hc_dynamic(N, C, LAYER_INDEX) if kind == "dynamic" else hc_init.hc_static(N, LAYER_INDEX)
    out = {}
    for name, value in params.items():
        noise = 0.02 * torch.randn(value.shape, generator=gen)
        out[name] = (value + noise).to(device)
    return out


def make_layer(coeffs, aggregate, mix, names):
    """The sub-layer as fn(x, f, *params) -> (layer_input, out), params in ``names`` order."""

    def layer(x, f, *params):
        h_pre, h_post, h_res = coeffs(x, **dict(zip(names, params)), norm=NORM, use_tanh=USE_TANH)
        return aggregate(x, h_pre), mix(f, x, h_post, h_res)

    return layer


def make_package_module(params: Dict[str, torch.Tensor], C: int, dtype: torch.dtype, device):
    """A hyper_connections.HyperConnections with the benchmark's dynamic-HC parameters."""
    from hyper_connections import get_init_and_expand_reduce_stream_functions

    init_hc, _expand, _reduce = get_init_and_expand_reduce_stream_functions(N, dim=C)
    module = init_hc(layer_index=LAYER_INDEX, tanh=USE_TANH)
    with torch.no_grad():
        module.static_alpha.copy_(params["static_alpha"])
        module.static_beta.copy_(params["static_beta"])
        module.dynamic_alpha_fn.copy_(params["dynamic_alpha"])
        module.dynamic_beta_fn.copy_(params["dynamic_beta"])
        module.dynamic_alpha_scale.copy_(params["alpha_scale"])
        module.dynamic_beta_scale.copy_(params["beta_scale"])
        module.norm.gamma.copy_(params["norm_weight"] - 1)  # its RMSNorm multiplies by gamma + 1
    return module.to(device=device, dtype=dtype)


def make_package_layer(module, T: int, C: int):
    def layer(x, f):
        branch_input, add_residual = module(x.view(T * N, C))  # (b s) d, streams innermost
        return branch_input, add_residual(f).view(T, N, C)

    return layer


def package_difference(module, params, x, f) -> float:
    """Largest |package - hcext| over (layer_input, out), fp32 module, no grad."""
    T, _, C = x.shape
    fp32 = copy_module.deepcopy(module).float()
    with torch.no_grad():
        pkg = make_package_layer(fp32, T, C)(x.float(), f.float())
        ours = make_layer(ops.hc_coeffs, ops.stream_aggregate, ops.stream_mix_expand, list(params))(
            x.float(), f.float(), *params.values()
        )
    return max((a - b).abs().max().item() for a, b in zip(pkg, ours))


def run_config(kind, T, C, dtype, device, modes, repeats, warmup, with_compile, with_package, log=print) -> List[dict]:
    gen = torch.Generator().manual_seed(T + C)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    x, f, g_in, g_out = rand(T, N, C), rand(T, C), rand(T, C), rand(T, N, C)
    params = make_params(kind, C, device, seed=C)
    names = list(params)
    copy, copy_bytes = copy_callable(x)
    use_package = with_package and kind == "dynamic"
    module = make_package_module(params, C, dtype, device) if use_package else None
    key = {"kind": kind, "tokens": T, "n": N, "C": C, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for mode in modes:
        grad = mode == "fwd+bwd"
        leaf = lambda t: t.detach().clone().requires_grad_(True) if grad else t  # noqa: E731
        xs, fs, ps = leaf(x), leaf(f), [leaf(p) for p in params.values()]
        args = [xs, fs, *ps]
        fns = {
            "hcext": make_layer(ops.hc_coeffs, ops.stream_aggregate, ops.stream_mix_expand, names),
            "eager": make_layer(reference.hc_coeffs, reference.stream_aggregate, reference.stream_mix_expand, names),
        }
        if with_compile:
            fns["compiled"] = compile_fresh(fns["eager"])
        # Before timing: hcext's sub-layer against the reference (outputs and, in fwd+bwd, every gradient).
        check = check_against_reference(fns["hcext"], fns["eager"], [x, f, *params.values()],
                                        (g_in, g_out) if grad else None, f"hc {kind} T={T} C={C} {dtype} {mode}")
        specs = {name: (fn, args, args) for name, fn in fns.items()}
        if use_package:
            specs["package"] = (make_package_layer(module, T, C), [xs, fs], [xs, fs, *module.parameters()])
        calls = sublayer_callables(specs, (g_in, g_out), mode)
        calls["copy"] = copy
        timings = harness.time_interleaved(
            calls, device, repeats=repeats, warmup=warmup, min_sample_ms=0.5 if device.type == "cuda" else 0.0
        )
        row = {**key, "mode": mode, "norm": NORM, "use_tanh": USE_TANH, "check": check}
        row["timings"] = {name: t.summary() for name, t in timings.items()}
        speedups(row, timings, baselines=("eager", "compiled", "package"))
        row["bytes_must_move"] = bytes_must_move(T, N, C, x.element_size(), mode)
        row["copy_bytes"] = copy_bytes
        row["bandwidth"] = bandwidth_stats(row["bytes_must_move"], timings["hcext"], copy_bytes, timings["copy"])
        if use_package and mode == "fwd":
            row["package_max_abs_diff_fp32"] = package_difference(module, params, x, f)
        row["_timings"] = timings
        rows.append(row)
        bw = row["bandwidth"]
        log(f"{kind:7s} T={T} C={C} {key['dtype']:8s} {mode:8s} "
            + "  ".join(f"{name} {harness.fmt_ms(t)}" for name, t in timings.items())
            + f"  hcext {bw['gbps']:.1f} GB/s = {bw['fraction_of_copy']:.2f} of copy")
        del specs, calls, fns, args
    return rows


def table(results, variants) -> str:
    header = ["kind", "T", "C", "dtype", "mode"] + [f"{v} ms" for v in variants] + ["copy ms"]
    header += [f"hcext vs {b}" for b in variants if b != "hcext"] + ["hcext GB/s", "of copy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        t = r["_timings"]
        cells = [r["kind"], str(r["tokens"]), str(r["C"]), r["dtype"], r["mode"]]
        cells += [harness.fmt_ms(t.get(v)) for v in variants] + [harness.fmt_ms(t["copy"])]
        for b in variants:
            if b == "hcext":
                continue
            cells.append(f"{r[f'speedup_vs_{b}']:.1f}x ({r[f'speedup_vs_{b}_min']:.1f}x)" if f"speedup_vs_{b}" in r else "-")
        cells += [f"{r['bandwidth']['gbps']:.1f}", f"{r['bandwidth']['fraction_of_copy']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: T=64, C=64, fp32, 2 repeats, no torch.compile")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: os.cpu_count())")
    p.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="C values (default 1024 2560)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="default float32 bfloat16")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="default dynamic static")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-package", action="store_true", help="skip the hyper-connections package variant")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/hc-<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    threads = harness.set_threads(args.threads)
    repeats, warmup, with_compile = args.repeats, args.warmup, not args.no_compile
    with_package = not args.no_package and _package_version() is not None
    tokens, channels, dtypes = TOKENS, args.channels, args.dtypes
    if args.quick:
        repeats, warmup, with_compile, tokens, channels, dtypes = 2, 1, False, 64, [64], ["float32"]
    variants = [v for v in VARIANTS if (with_compile or v != "compiled") and (with_package or v != "package")]

    meta = harness.metadata(device, threads)
    meta["loadavg_start"] = os.getloadavg()  # 1, 5 and 15 minute load averages
    meta["hyper_connections_version"] = _package_version()
    print(f"# HC sub-layer benchmark: {meta['device_name']}, {threads} threads, torch {meta['torch_version']}, "
          f"hyper-connections {meta['hyper_connections_version']}, n={N}, norm={NORM}, tanh={USE_TANH}, "
          f"{repeats} interleaved repeats; times: median (min) ms")
    results = []
    for dtype in dtypes:
        for C in channels:
            for kind in args.kinds:
                results += run_config(kind, tokens, C, getattr(torch, dtype), device, MODES, repeats, warmup,
                                      with_compile, with_package)
    meta["loadavg_end"] = os.getloadavg()  # the machine may be shared: how busy it was
    print()
    print(table(results, variants))

    out = args.out
    if out is None and not args.quick:
        out = os.path.join(harness.RESULTS_DIR, f"hc-{device.type}.json")
    if out:
        config = {"benchmark": "hc", "n": N, "norm": NORM, "use_tanh": USE_TANH, "layer_index": LAYER_INDEX,
                  "repeats": repeats, "warmup": warmup, "variants": variants, "kinds": args.kinds, "quick": args.quick,
                  "gradients": "torch.autograd.grad (no .grad accumulation)"}
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        harness.write_json(out, meta, clean, config=config)
        print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
