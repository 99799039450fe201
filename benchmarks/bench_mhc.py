"""Benchmark of a whole mHC sub-layer (branch excluded) on hcext against the pure-PyTorch
reference, with the achieved bandwidth measured against a same-size copy.

The sub-layer, for streams x [T, n, C] and a pre-allocated f [T, C] standing for the branch
output (the branch itself is not timed):

    layer_input, h_post, h_res = mhc_pre(x, phi, alpha, bias)      # 20 Sinkhorn iterations, 2σ
    out = stream_mix_expand(f, x, h_post, h_res)

Variants (the same pre-allocated inputs):
  hcext     hcext.ops.mhc_pre + hcext.ops.stream_mix_expand (the C++/CUDA kernels)
  eager     hcext.reference.mhc_pre + hcext.reference.stream_mix_expand, eager PyTorch
  compiled  torch.compile of that reference sub-layer (inductor, static shapes, compiled
            afresh for every shape and mode during the warm-up)
  liger     --device cuda only, when liger_kernel (Liger-Kernel >= 0.8) is importable: its mHC
            functional ops liger_mhc_coeffs + liger_mhc_pre + liger_mhc_post_res (Triton), with
            the same phi, bias, alpha, 20 Sinkhorn iterations, eps 1e-6, pre_eps 1e-6 and
            post_mult 2. Its conventions differ in two ways: alpha is three 0-d tensors, and for
            bf16/fp16 x its phi is cast to x's dtype (its tensor-core path, what LigerMHC does
            by default; hcext keeps phi fp32); fp32 x runs with allow_fp32=True. Its Sinkhorn
            starts with a row softmax and ends on a column normalisation (hcext: column softmax,
            ends on rows), so its h_res is not hcext's and only layer_input is comparable: the
            JSON records the largest difference of layer_input from hcext's (fwd rows). When it
            cannot run, the JSON's config.liger.skipped says why.
  copy      dst.copy_(x) into a pre-allocated dst of x's size and dtype: the bandwidth yardstick,
            timed in the same interleaved rounds as the sub-layer
  clone     x.clone(): the same copy into a fresh allocation, for context. The sub-layer's
            outputs are fresh allocations too; on the CPU a fresh allocation this large is a
            new mmap whose pages fault in on first write, which the pre-allocated copy does
            not pay. The JSON's ``bandwidth_vs_clone`` compares with it.
Modes:
  fwd       under torch.no_grad
  fwd+bwd   forward with x, phi, alpha, bias and f requiring grad, then
            torch.autograd.grad([layer_input, out], [x, phi, alpha, bias, f], [g_in, g_out])
            with pre-allocated incoming gradients. autograd.grad returns the gradients instead
            of accumulating them into .grad, so no variant pays an extra pass over x for the
            accumulation.

Bytes the sub-layer must move (s = bytes per element of x's dtype; per token; coefficient-
sized traffic, O(n^2) per token, is negligible and not counted):
  fwd       read x (n*C) and f (C), write layer_input (C) and out (n*C):  (2n + 2) * C * s
  fwd+bwd   fwd, plus read the incoming gradients g_out (n*C) and g_in (C), x again (n*C: the
            gradients of h_res and of the norm need it) and f again (C: the gradient of h_post
            needs it), and write grad_x (n*C) and grad_f (C):            (5n + 5) * C * s
This is a lower bound: it counts x once in the forward although the two ops of the sub-layer
each read it (the branch sits between them, and x does not fit in cache). The JSON's
``bytes_two_pass`` / ``bandwidth_two_pass`` (the table's "x read per op" column) count x once
per op that reads it: (3n + 2) * C * s for fwd, (6n + 5) * C * s for fwd+bwd.
The copy moves 2 * |x| bytes (read + write); "of copy" is (bytes must-move / sub-layer time)
/ (2 * |x| / copy time), with medians (and, in the JSON, mins) of both.

Stream ops alone (mode "ops", forward, no grad): hcext.ops.stream_aggregate (reads n*C, writes
C per token) and hcext.ops.stream_mix_expand (reads n*C + C, writes n*C) with fixed
coefficients, in GB/s and as a fraction of the copy's GB/s.

Correctness (asserted before timing): hcext's sub-layer (outputs and, in fwd+bwd, the gradients
of every input) and the two stream ops against hcext.reference run in float64, by the test
suite's tolerance table (tests/helpers.py; check_against_reference); each row's ``check``
records the largest error as a fraction of the allowed one.

Targets (reported, not asserted): CPU fwd+bwd >= 10x eager and >= 3x compiled; bytes must-move /
time within 3x of the copy (>= 1/3 of copy bandwidth); on GPU the stream ops >= 80% of copy.

Usage, from the repository root:
  python -m benchmarks.bench_mhc [--device cpu|cuda] [--quick] [--repeats N] [--warmup N]
                                 [--threads N] [--no-compile] [--no-liger] [--out PATH]
Prints markdown tables and writes JSON to benchmarks/results/mhc-<device>.json (--quick: only
with --out).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import hcext  # noqa: E402,F401  (loads the native library: torch.ops.hcext.*)
from benchmarks import harness  # noqa: E402
from hcext import ops, reference  # noqa: E402
from hcext.nn import mhc_bias_init  # noqa: E402

N = 4
TOKENS = 4096
CHANNELS = (1024, 2560)
DTYPES = ("float32", "bfloat16")
GPU_EXTRA = ((16384, 4096, "bfloat16"),)  # (T, C, dtype), --device cuda only
ITERS = 20  # the paper's Sinkhorn iterations
POST_MULT = 2.0  # the paper's 2σ
ALPHA = 0.01
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("hcext", "eager", "compiled", "liger")
EPS = 1e-6  # RMS-norm, Sinkhorn and h_pre epsilons: hcext's defaults (Liger's pre_eps default is 0)
TARGETS = {"speedup_vs_eager": 10.0, "speedup_vs_compiled": 3.0, "fraction_of_copy": 1.0 / 3.0, "ops_fraction_of_copy": 0.8}


# ---------------------------------------------------------------------------------------
# Bytes and bandwidth (shared with bench_hc: the HC sub-layer moves the same tensors)


def bytes_must_move(tokens: int, n: int, C: int, itemsize: int, mode: str, two_pass: bool = False) -> int:
    """Bytes a sub-layer (coefficients + aggregate + expand-mix, branch excluded) must move;
    see the module docstring. two_pass: count x once per op that reads it."""
    if mode == "fwd":
        per_token = (3 * n + 2) if two_pass else (2 * n + 2)
    elif mode == "fwd+bwd":
        per_token = (6 * n + 5) if two_pass else (5 * n + 5)
    else:
        raise ValueError(mode)
    return tokens * per_token * C * itemsize


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def bandwidth_stats(nbytes: int, t: harness.Timing, copy_bytes: int, copy: harness.Timing) -> Dict[str, float]:
    """Achieved GB/s of ``nbytes`` in time t, and its fraction of the copy's GB/s (medians; *_min: mins)."""
    out = {}
    for stat, suffix in (("median", ""), ("min", "_min")):
        achieved = gbps(nbytes, getattr(t, stat))
        copy_gbps = gbps(copy_bytes, getattr(copy, stat))
        out[f"gbps{suffix}"] = achieved
        out[f"copy_gbps{suffix}"] = copy_gbps
        out[f"fraction_of_copy{suffix}"] = achieved / copy_gbps
    return out


def copy_callable(x: torch.Tensor) -> Tuple[Callable[[], object], int]:
    """A pre-allocated copy of x's size: (callable, bytes it moves)."""
    dst = torch.empty_like(x)
    dst.copy_(x)  # touch the pages now, not in the first timed call
    return (lambda: dst.copy_(x)), 2 * x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------
# Timed callables


def sublayer_callables(
    specs: Mapping[str, Tuple[Callable, Sequence, Sequence[torch.Tensor]]],
    grads: Sequence[torch.Tensor],
    mode: str,
) -> Dict[str, Callable[[], object]]:
    """Zero-argument callables for one mode.

    specs: {name: (fn, args, wrt)}: ``fn(*args)`` returns (layer_input, out); in fwd+bwd the
    gradients of (layer_input, out) are ``grads`` and are taken with respect to ``wrt``.
    """
    calls = {}
    for name, (fn, args, wrt) in specs.items():
        if mode == "fwd":
            def call(fn=fn, args=args):
                with torch.no_grad():
                    return fn(*args)
        else:
            def call(fn=fn, args=args, wrt=tuple(wrt)):
                return torch.autograd.grad(fn(*args), wrt, grads)
        calls[name] = call
    return calls


def compile_fresh(fn: Callable) -> Callable:
    """torch.compile(fn) after a dynamo reset: a fresh compile per shape and mode (no
    recompile-limit fallbacks, no dynamic shapes)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def speedups(row: dict, timings: Mapping[str, harness.Timing], baselines=("eager", "compiled"), cand: str = "hcext"):
    for base in baselines:
        if base in timings and cand in timings:
            row[f"speedup_vs_{base}"] = harness.speedup(timings[base], timings[cand])
            row[f"speedup_vs_{base}_min"] = harness.speedup(timings[base], timings[cand], "min")


# ---------------------------------------------------------------------------------------
# Correctness before timing (shared by every bench_*.py): what is timed is checked against
# hcext.reference with the test suite's one tolerance table (tests/helpers.py)

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _test_helpers():
    """tests/helpers.py: TOLERANCES and the comparisons built on it (imported on first use;
    needs pytest, which requirements-dev.txt installs)."""
    tests_dir = os.path.join(harness.REPO_ROOT, "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import helpers

    return helpers


def run_and_grad(fn: Callable, args: Sequence, grads: Sequence[torch.Tensor] = None):
    """(outputs, gradients): fn(*args) on fresh leaves of its floating tensor arguments and, with
    ``grads`` (the incoming gradients of the outputs, in order), the gradient of every floating
    tensor argument (zeros where unused), all detached. Without grads: under no_grad, no gradients."""
    if grads is None:
        with torch.no_grad():
            outs = fn(*args)
        return [o.detach() for o in ((outs,) if isinstance(outs, torch.Tensor) else outs)], []
    leaves = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    outs = fn(*leaves)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(wrt, got)]


def _as(values: Sequence, dtype: torch.dtype) -> list:
    return [v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values]


def check_against_reference(fn: Callable, reference: Callable, args: Sequence, grads: Sequence[torch.Tensor] = None,
                            what: str = "") -> dict:
    """Asserts, before timing, that hcext computes what the benchmark times: ``fn(*args)`` (and,
    with ``grads``, the gradients of every floating argument for those incoming gradients)
    against ``reference`` run in float64 on the same values, by the rule of the test suite's
    tolerance table (tests/helpers.py, as check_parity applies it): float32 inputs within the
    float32 row (atol scaled by max(1, max |reference|), assert_scaled_close); any bfloat16 /
    float16 input: each result's error at most twice that of the reference run on the same
    low-precision inputs, plus the float32 atol (assert_within_twice_reference_error).

    Returns ``{"reference": "float64", "rule": ..., "worst": w}`` for the JSON: w is the largest
    error as a fraction of the error allowed (<= 1, or this raised AssertionError)."""
    h = _test_helpers()
    got_outs, got_grads = run_and_grad(fn, args, grads)
    grads64 = _as(grads, torch.float64) if grads else None
    want_outs, want_grads = run_and_grad(reference, _as(args, torch.float64), grads64)
    low = any(isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION for a in args)
    lowp = run_and_grad(reference, args, grads) if low else None
    items = [(f"output {k}", a, b, lowp[0][k] if low else None)
             for k, (a, b) in enumerate(zip(got_outs, want_outs))]
    items += [(f"gradient {k}", a, b, lowp[1][k] if low else None)
              for k, (a, b) in enumerate(zip(got_grads, want_grads))]
    assert len(got_outs) == len(want_outs) and len(got_grads) == len(want_grads), what
    atol32, rtol32 = h.TOLERANCES[torch.float32]["atol"], h.TOLERANCES[torch.float32]["rtol"]
    worst = 0.0
    for name, a, e, e_low in items:
        label = f"{what}: {name} against hcext.reference (float64)"
        e = e.to(a.device)
        if a.numel() == 0:
            continue
        scale = max(1.0, e.abs().max().item())
        err = (a.double() - e.double()).abs()
        if low:
            h.assert_within_twice_reference_error(a, e, e_low, name=label)
            ref_err = (e_low.double() - e.double()).abs().max().item()
            worst = max(worst, err.max().item() / (2 * ref_err + atol32 * scale))
        else:
            h.assert_scaled_close(a, e, torch.float32, name=label)
            worst = max(worst, (err / (atol32 * scale + rtol32 * e.double().abs())).max().item())
    rule = ("twice the low-precision reference's error + the float32 atol" if low
            else "tests/helpers.py TOLERANCES float32 row, atol scaled by max(1, max |reference|)")
    return {"reference": "hcext.reference in float64", "rule": rule, "worst": worst}


# ---------------------------------------------------------------------------------------
# The mHC sub-layer


def hcext_layer(x, phi, alpha, bias, f):
    layer_input, h_post, h_res = ops.mhc_pre(x, phi, alpha, bias, ITERS, post_mult=POST_MULT)
    return layer_input, ops.stream_mix_expand(f, x, h_post, h_res)


def reference_layer(x, phi, alpha, bias, f):
    layer_input, h_post, h_res = reference.mhc_pre(x, phi, alpha, bias, ITERS, post_mult=POST_MULT)
    return layer_input, reference.stream_mix_expand(f, x, h_post, h_res)


# ---------------------------------------------------------------------------------------
# Liger-Kernel's mHC ops (optional, GPU only: Triton kernels)


def liger_functional(device: torch.device):
    """(liger_kernel.transformers.functional, None) when the liger variant can run on device,
    else (None, why not). Imported here only: liger_kernel is no dependency of hcext."""
    if device.type != "cuda":
        return None, "Liger-Kernel's mHC ops are Triton kernels: --device cuda only"
    try:
        from liger_kernel.transformers import functional
    except Exception as e:  # not installed, or triton missing / broken
        return None, f"liger_kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel"
    if not hasattr(functional, "liger_mhc_coeffs"):  # mHC ops arrived in Liger-Kernel 0.8.0
        return None, "this liger_kernel has no mHC ops (needs liger-kernel >= 0.8.0)"
    return functional, None


def liger_version():
    try:
        import importlib.metadata

        return importlib.metadata.version("liger-kernel")
    except Exception:  # not installed
        return None


def make_liger_layer(functional):
    """The sub-layer on Liger-Kernel's ops: fn(x, phi, alpha_pre, alpha_post, alpha_res, bias, f)."""

    def layer(x, phi, alpha_pre, alpha_post, alpha_res, bias, f):
        h_pre, h_post, h_res = functional.liger_mhc_coeffs(
            x, phi, bias, alpha_pre, alpha_post, alpha_res, allow_fp32=x.dtype == torch.float32,
            tmax=ITERS, rms_eps=EPS, pre_eps=EPS, sinkhorn_eps=EPS, post_mult=POST_MULT,
        )
        return functional.liger_mhc_pre(x, h_pre), functional.liger_mhc_post_res(x, f, h_post, h_res)

    return layer


def liger_args(x, phi, alpha, bias, f):
    """The benchmark's values in Liger's layout: phi in x's dtype for 16-bit x (its tensor-core
    path), alpha split into three 0-d tensors."""
    phi_l = phi.to(x.dtype) if x.dtype in (torch.bfloat16, torch.float16) else phi
    return [x, phi_l, alpha[0].clone(), alpha[1].clone(), alpha[2].clone(), bias, f]


def make_inputs(T: int, C: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Streams, paper-like parameters (phi ~ N(0, 1/sqrt(nC)), alpha 0.01, the Pre-Norm bias
    plus noise), the branch output f and the incoming gradients."""
    gen = torch.Generator().manual_seed(seed)
    n, D = N, N * N + 2 * N
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = rand(T, n, C).to(device, dtype)
    phi = (rand(n * C, D) / math.sqrt(n * C)).to(device)
    alpha = torch.full((3,), ALPHA, device=device)
    bias = (mhc_bias_init(n) + 0.1 * rand(D)).to(device)
    f = rand(T, C).to(device, dtype)
    g_in = rand(T, C).to(device, dtype)
    g_out = rand(T, n, C).to(device, dtype)
    return x, phi, alpha, bias, f, g_in, g_out


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_config(T, C, dtype, device, modes, repeats, warmup, with_compile, liger=None, log=print) -> List[dict]:
    """Times one shape in every mode, then the stream ops alone. liger: Liger-Kernel's functional
    module (see liger_functional) to add the liger variant, or None."""
    x, phi, alpha, bias, f, g_in, g_out = make_inputs(T, C, dtype, device, seed=T + C)
    itemsize = x.element_size()
    copy, copy_bytes = copy_callable(x)
    sync_kw = dict(repeats=repeats, warmup=warmup, min_sample_ms=0.5 if device.type == "cuda" else 0.0)
    key = {"tokens": T, "n": N, "C": C, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for mode in modes:
        args = [x, phi, alpha, bias, f] if mode == "fwd" else _leaves(x, phi, alpha, bias, f)
        fns = {"hcext": hcext_layer, "eager": reference_layer}
        if with_compile:
            fns["compiled"] = compile_fresh(reference_layer)
        # Before timing: hcext's sub-layer against the reference (outputs and, in fwd+bwd, every gradient).
        check = check_against_reference(hcext_layer, reference_layer, [x, phi, alpha, bias, f],
                                        None if mode == "fwd" else (g_in, g_out), f"mhc T={T} C={C} {dtype} {mode}")
        specs = {name: (fn, args, args) for name, fn in fns.items()}
        if liger is not None:
            base = liger_args(x, phi, alpha, bias, f)
            largs = base if mode == "fwd" else _leaves(*base)
            specs["liger"] = (make_liger_layer(liger), largs, largs)
        calls = sublayer_callables(specs, (g_in, g_out), mode)
        calls["copy"] = copy
        calls["clone"] = x.clone
        timings = harness.time_interleaved(calls, device, **sync_kw)
        row = {**key, "mode": mode, "sinkhorn_iters": ITERS, "post_mult": POST_MULT, "check": check}
        row["timings"] = {name: t.summary() for name, t in timings.items()}
        speedups(row, timings, baselines=("eager", "compiled", "liger"))
        if liger is not None and mode == "fwd":
            with torch.no_grad():  # checks the parameter mapping: h_pre (so layer_input) is the same formula
                ours = hcext_layer(x, phi, alpha, bias, f)[0]
                theirs = make_liger_layer(liger)(*liger_args(x, phi, alpha, bias, f))[0]
            row["liger_layer_input_max_abs_diff"] = (ours.float() - theirs.float()).abs().max().item()
        row["bytes_must_move"] = bytes_must_move(T, N, C, itemsize, mode)
        row["bytes_two_pass"] = bytes_must_move(T, N, C, itemsize, mode, two_pass=True)
        row["copy_bytes"] = copy_bytes
        row["bandwidth"] = bandwidth_stats(row["bytes_must_move"], timings["hcext"], copy_bytes, timings["copy"])
        row["bandwidth_two_pass"] = bandwidth_stats(row["bytes_two_pass"], timings["hcext"], copy_bytes, timings["copy"])
        row["bandwidth_vs_clone"] = bandwidth_stats(row["bytes_must_move"], timings["hcext"], copy_bytes, timings["clone"])
        row["_timings"] = timings
        rows.append(row)
        bw = row["bandwidth"]
        log(f"T={T} C={C} {key['dtype']:8s} {mode:8s} "
            + "  ".join(f"{name} {harness.fmt_ms(t)}" for name, t in timings.items())
            + f"  hcext {bw['gbps']:.1f} GB/s = {bw['fraction_of_copy']:.2f} of copy")
        del specs, calls, fns, args
    rows.append(run_stream_ops(x, phi, alpha, bias, f, key, copy, copy_bytes, device, sync_kw, log))
    return rows


def run_stream_ops(x, phi, alpha, bias, f, key, copy, copy_bytes, device, sync_kw, log) -> dict:
    """stream_aggregate and stream_mix_expand alone (fixed coefficients) against the copy."""
    T, n, C = x.shape
    s = x.element_size()
    with torch.no_grad():
        h_pre, h_post, h_res = ops.mhc_coeffs(x, phi, alpha, bias, ITERS, post_mult=POST_MULT)

        def aggregate():
            with torch.no_grad():
                return ops.stream_aggregate(x, h_pre)

        def mix():
            with torch.no_grad():
                return ops.stream_mix_expand(f, x, h_post, h_res)

    # Before timing: both ops against the reference, on the same coefficients.
    check = {
        "aggregate": check_against_reference(ops.stream_aggregate, reference.stream_aggregate, [x, h_pre],
                                             what=f"stream_aggregate T={T} C={C} {x.dtype}"),
        "mix_expand": check_against_reference(ops.stream_mix_expand, reference.stream_mix_expand, [f, x, h_post, h_res],
                                              what=f"stream_mix_expand T={T} C={C} {x.dtype}"),
    }
    timings = harness.time_interleaved({"aggregate": aggregate, "mix_expand": mix, "copy": copy}, device, **sync_kw)
    row = {**key, "mode": "ops", "timings": {name: t.summary() for name, t in timings.items()},
           "copy_bytes": copy_bytes, "check": check}
    row["bytes"] = {"aggregate": T * (n + 1) * C * s, "mix_expand": T * (2 * n + 1) * C * s}
    row["bandwidth"] = {op: bandwidth_stats(row["bytes"][op], timings[op], copy_bytes, timings["copy"])
                        for op in ("aggregate", "mix_expand")}
    row["_timings"] = timings
    log(f"T={T} C={C} {key['dtype']:8s} ops      "
        + "  ".join(f"{op} {harness.fmt_ms(timings[op])} = {bw['gbps']:.1f} GB/s ({bw['fraction_of_copy']:.2f} of copy)"
                    for op, bw in row["bandwidth"].items())
        + f"  copy {harness.fmt_ms(timings['copy'])}")
    return row


# ---------------------------------------------------------------------------------------
# Reports


def _key_cells(r):
    return (str(r["tokens"]), str(r["C"]), r["dtype"], r["mode"])


def sublayer_table(results, variants) -> str:
    """'median (min)' ms per variant, hcext's speed-ups (median; min in brackets) and its
    bandwidth against the copy."""
    header = ["T", "C", "dtype", "mode"] + [f"{v} ms" for v in variants] + ["copy ms", "clone ms"]
    header += [f"hcext vs {b}" for b in variants if b != "hcext"]
    header += ["hcext GB/s", "copy GB/s", "of copy", "of copy (x read per op)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        if r["mode"] == "ops":
            continue
        t = r["_timings"]
        cells = list(_key_cells(r)) + [harness.fmt_ms(t.get(v)) for v in variants]
        cells += [harness.fmt_ms(t["copy"]), harness.fmt_ms(t["clone"])]
        for b in variants:
            if b == "hcext":
                continue
            cells.append(f"{r[f'speedup_vs_{b}']:.1f}x ({r[f'speedup_vs_{b}_min']:.1f}x)" if f"speedup_vs_{b}" in r else "-")
        bw, bw2 = r["bandwidth"], r["bandwidth_two_pass"]
        cells += [f"{bw['gbps']:.1f}", f"{bw['copy_gbps']:.1f}", f"{bw['fraction_of_copy']:.2f}",
                  f"{bw2['fraction_of_copy']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ops_table(results) -> str:
    header = ["T", "C", "dtype", "aggregate ms", "aggregate GB/s", "of copy", "mix_expand ms", "mix_expand GB/s",
              "of copy", "copy ms", "copy GB/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        if r["mode"] != "ops":
            continue
        t, bw = r["_timings"], r["bandwidth"]
        cells = list(_key_cells(r)[:3])
        for op in ("aggregate", "mix_expand"):
            cells += [harness.fmt_ms(t[op]), f"{bw[op]['gbps']:.1f}", f"{bw[op]['fraction_of_copy']:.2f}"]
        cells += [harness.fmt_ms(t["copy"]), f"{bw['aggregate']['copy_gbps']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(results, device_type: str) -> List[str]:
    """One line per target and row: measured value, target, met or not."""
    lines = []
    for r in results:
        k = f"T={r['tokens']} C={r['C']} {r['dtype']} {r['mode']}"
        if r["mode"] == "ops":
            if device_type == "cuda":
                for op in ("aggregate", "mix_expand"):
                    v = r["bandwidth"][op]["fraction_of_copy"]
                    lines.append(f"{k} {op}: {v:.2f} of copy (target >= 0.80): {'met' if v >= 0.8 else 'NOT met'}")
            continue
        if r["mode"] == "fwd+bwd" and device_type == "cpu":
            for base, target in (("eager", TARGETS["speedup_vs_eager"]), ("compiled", TARGETS["speedup_vs_compiled"])):
                if f"speedup_vs_{base}" in r:
                    v = r[f"speedup_vs_{base}"]
                    lines.append(f"{k}: {v:.1f}x vs {base} (target >= {target:g}x): {'met' if v >= target else 'NOT met'}")
        v = r["bandwidth"]["fraction_of_copy"]
        lines.append(f"{k}: {v:.2f} of copy bandwidth (target >= 0.33): {'met' if v >= 1 / 3 else 'NOT met'}")
    return lines


def configs(device: torch.device, quick: bool):
    if quick:
        return [(64, 64, torch.float32)]
    out = [(TOKENS, C, getattr(torch, d)) for d in DTYPES for C in CHANNELS]
    if device.type == "cuda":
        out += [(T, C, getattr(torch, d)) for T, C, d in GPU_EXTRA]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: T=64, C=64, fp32, 2 repeats, no torch.compile")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: os.cpu_count())")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel variant (GPU only)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/mhc-<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    threads = harness.set_threads(args.threads)
    repeats, warmup, with_compile = args.repeats, args.warmup, not args.no_compile
    if args.quick:
        repeats, warmup, with_compile = 2, 1, False
    liger, liger_skipped = (None, "--no-liger") if args.no_liger else liger_functional(device)
    variants = [v for v in VARIANTS if (with_compile or v != "compiled") and (liger is not None or v != "liger")]

    meta = harness.metadata(device, threads)
    meta["liger_kernel_version"] = liger_version()
    meta["loadavg_start"] = os.getloadavg()  # 1, 5 and 15 minute load averages
    print(f"# mHC sub-layer benchmark: {meta['device_name']}, {threads} threads, torch {meta['torch_version']}, "
          f"n={N}, {ITERS} Sinkhorn iterations, {repeats} interleaved repeats; times: median (min) ms")
    results = []
    for T, C, dtype in configs(device, args.quick):
        results += run_config(T, C, dtype, device, MODES, repeats, warmup, with_compile, liger)
    meta["loadavg_end"] = os.getloadavg()  # the machine may be shared: how busy it was
    print()
    print(sublayer_table(results, variants))
    print()
    print(ops_table(results))
    print()
    print("\n".join(target_lines(results, device.type)))
    if liger_skipped:
        print(f"\nliger variant skipped: {liger_skipped}")

    out = args.out
    if out is None and not args.quick:
        out = os.path.join(harness.RESULTS_DIR, f"mhc-{device.type}.json")
    if out:
        config = {"benchmark": "mhc", "n": N, "sinkhorn_iters": ITERS, "post_mult": POST_MULT, "alpha": ALPHA,
                  "repeats": repeats, "warmup": warmup, "variants": variants, "quick": args.quick,
                  "targets": TARGETS, "gradients": "torch.autograd.grad (no .grad accumulation)",
                  "liger": {"version": meta["liger_kernel_version"], "skipped": liger_skipped,
                            "phi_dtype": "x's dtype for bf16/fp16 x, fp32 for fp32 x (allow_fp32=True)"}}
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        harness.write_json(out, meta, clean, config=config)
        print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
