"""Activation memory of mHC with and without block recompute (mHC §4.3.2; issue 8).

A stack of L transformer layers (2L sub-layers: causal self-attention and MLP, each with
its Pre-Norm inside the branch), one forward + backward, four ways on the same weights:

* ``residual``      — plain ``h = h + F(h)`` per sub-layer (the baseline);
* ``mhc``           — every sub-layer an mHC ``HyperConnection`` (n streams), no recompute;
* ``mhc_recompute`` — the same in a ``hcext.nn.HyperConnectionStack`` with block recompute
  (``recompute_block="auto"``: L_r = round(sqrt(n·2L/(n+2))));
* ``residual_sac``  — the residual model under the same selective-checkpoint policy
  (``hcext.nn.recompute_policy``, blocks of the same L_r): the fair reference for
  ``mhc_recompute``, since the policy also recomputes the branches' cheap ops (norms,
  activations) and keeps only their matmul / attention outputs.

Activation memory = the peak of the live bytes during forward + backward minus the live
bytes before the forward (parameters, their gradient buffers — allocated by a warm-up step —
the input and its gradient are excluded). Also recorded: the live bytes right after the
forward (what is kept for backward, the output included).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the forward (bf16 branches and streams, fp32 coefficients).
* CPU (fp32): the live bytes of glibc's malloc (``mallinfo2``: heap chunks in use +
  mmapped chunks), sampled after every dispatched op by a ``TorchDispatchMode`` active
  during forward and backward (on the CPU autograd runs backward in the calling thread).
  Each variant runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``,
  ``MALLOC_TRIM_THRESHOLD_=0`` and ``MALLOC_TOP_PAD_=0``, so that every tensor above 64 KiB
  is mmapped and returned to the system when freed (no allocator cache hides a free).
  Sampling after each op misses the scratch memory an op frees before it returns; the peak
  RSS increase (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), which
  includes it, is recorded as a cross-check. Each worker first checks the method on a known
  pattern (8 MiB + 16 MiB, free the 8, + 4 MiB: peak 24 MiB, 20 MiB live).

    python -m benchmarks.bench_memory [--device cpu|cuda] [--quick] [--threads N] [--out PATH]

Before measuring, the two mHC models (without and with recompute, training mode, the measured
dtype) are asserted to compute the reference's numbers on a short sequence: output and every
gradient against the same model on hcext.reference in float64, by the test suite's tolerance
table (``check_models``; the JSON summary's ``check``).

The issue's goal: mHC with recompute at most 1.10x the residual model's activation memory
(the HC paper reports +26% at n = 4 without recompute).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):  # python benchmarks/bench_memory.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hcext  # noqa: E402,F401
from hcext.nn import (  # noqa: E402
    HyperConnection, HyperConnectionStack, expand_streams, recompute_block_size, recompute_policy, reduce_streams,
)
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts  # noqa: E402

from benchmarks import bench_block, harness  # noqa: E402
from benchmarks.bench_mhc import check_against_reference  # noqa: E402
from hcext import reference as ref  # noqa: E402

VARIANTS = {
    "residual": "residual x + F(x)",
    "mhc": "mHC, no recompute",
    "mhc_recompute": "mHC + block recompute",
    "residual_sac": "residual + same selective checkpoint",
}
GOAL = 1.10  # mhc_recompute / residual, activation peak
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
MiB = 2**20


# ---------------------------------------------------------------------------------------
# Models


# The branches: the same pre-norm attention and MLP as the end-to-end block benchmark.
Attention, MLP = bench_block.Attention, bench_block.MLP


class Residual(nn.Module):
    """``h + F(h)`` per sub-layer; with ``block``, blocks of that many sub-layers under the
    selective-checkpoint policy of HyperConnectionStack."""

    def __init__(self, branches, block: Optional[int] = None):
        super().__init__()
        self.branches, self.block = nn.ModuleList(branches), block

    def _run(self, start, stop, h):
        for b in self.branches[start:stop]:
            h = h + b(h)
        return h

    def warmup(self, h):
        """Forward + backward of the first attention and MLP sub-layers, at the full shape."""
        out = self._run(0, 2, h)
        out.backward(torch.ones_like(out))

    def forward(self, h):
        L = len(self.branches)
        if not self.block:
            return self._run(0, L, h)
        context_fn = functools.partial(create_selective_checkpoint_contexts, recompute_policy)
        for start in range(0, L, self.block):
            h = checkpoint(functools.partial(self._run, start, min(start + self.block, L)), h,
                           use_reentrant=False, context_fn=context_fn)
        return h


class MHC(nn.Module):
    """Copy into n streams, the HyperConnectionStack, sum the streams."""

    def __init__(self, stack: HyperConnectionStack):
        super().__init__()
        self.stack, self.n = stack, stack.num_streams

    def warmup(self, h):
        """Forward + backward of the first attention and MLP sub-layers, at the full shape."""
        x = expand_streams(h, self.n)
        for layer in self.stack.layers[:2]:
            x = layer(x)
        x.backward(torch.ones_like(x))

    def forward(self, h):
        return reduce_streams(self.stack(expand_streams(h, self.n)))


def build(variant: str, cfg: dict, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    C, L = cfg["dim"], cfg["layers"]
    branches = [m for _ in range(L) for m in (Attention(C, cfg["heads"]), MLP(C))]
    if variant.startswith("residual"):
        model = Residual(branches, cfg["block_size"] if variant == "residual_sac" else None)
        return model.to(device=device, dtype=dtype)
    layers = [HyperConnection(C, cfg["streams"], kind="mhc", branch=b, layer_index=i) for i, b in enumerate(branches)]
    with torch.no_grad():  # away from init: coefficients that actually mix
        for hc in layers:
            hc.phi.normal_(0, 0.02)
    stack = HyperConnectionStack(layers, cfg["block_size"] if variant == "mhc_recompute" else None)
    for b in branches:
        b.to(device=device, dtype=dtype)  # the coefficient parameters stay fp32
    return MHC(stack).to(device=device)


class ReferenceMHC(nn.Module):
    """MHC's model on hcext.reference (the same parameters, names included): per sub-layer
    ``y, h_post, h_res = mhc_pre(x, ...)``, ``x = stream_mix_expand(branch(y), x, h_post, h_res)``."""

    def __init__(self, stack: HyperConnectionStack):
        super().__init__()
        self.stack, self.n = stack, stack.num_streams

    def forward(self, h):
        x = expand_streams(h, self.n)
        for hc in self.stack.layers:
            y, h_post, h_res = ref.mhc_pre(x, hc.phi, hc.alpha, hc.bias, hc.sinkhorn_iters, hc.norm_eps,
                                           hc.sinkhorn_eps, hc.pre_eps, hc.post_mult)
            x = ref.stream_mix_expand(hc.branch(y).to(x.dtype), x, h_post, h_res)
        return reduce_streams(x)


def check_models(cfg: dict, device) -> Dict[str, dict]:
    """Before measuring: the mHC models that are measured (without and with recompute, in training
    mode, the measured dtype) on a short sequence: output and the gradients of the input and of
    every parameter against ReferenceMHC run in float64, by the test suite's tolerance table
    (bench_mhc.check_against_reference)."""
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, min(cfg["seq"], 16), cfg["dim"], generator=gen).to(device, dtype)
    grad = torch.randn(h.shape, generator=gen).to(device, dtype)
    checks = {}
    for variant in ("mhc", "mhc_recompute"):
        model = build(variant, cfg, device, dtype).train()
        assert model.stack.recomputing() == (variant == "mhc_recompute")
        names = [n for n, _ in model.named_parameters()]
        reference = ReferenceMHC(model.stack)

        def as_fn(module):
            return lambda x, *params: torch.func.functional_call(module, dict(zip(names, params)), (x,))

        checks[variant] = check_against_reference(as_fn(model), as_fn(reference), [h, *model.parameters()], [grad],
                                                  f"memory {variant}")
        del model, reference
    return checks


def config(quick: bool, device: str, args) -> dict:
    if quick:
        cfg = dict(dim=64, heads=4, layers=2, streams=4, batch=2, seq=32)
    else:
        cfg = dict(dim=1024, heads=16, layers=12, streams=4, batch=4, seq=1024)
    for key in ("dim", "heads", "layers", "streams", "batch", "seq"):
        if getattr(args, key, None):
            cfg[key] = getattr(args, key)
    cfg["sub_layers"] = 2 * cfg["layers"]
    cfg["tokens"] = cfg["batch"] * cfg["seq"]
    cfg["block_size"] = args.block_size or recompute_block_size(cfg["streams"], cfg["sub_layers"])
    cfg["dtype"] = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    return cfg


# ---------------------------------------------------------------------------------------
# CPU measurement (in a subprocess with the MALLOC_* settings)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = None


def live_bytes() -> int:
    """Bytes malloc'ed and not yet freed (glibc mallinfo2: in-use heap chunks + mmapped chunks)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallinfo2.restype = _MallInfo2
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


class PeakTracker(TorchDispatchMode):
    """Samples live_bytes() after every dispatched op; ``peak`` is the highest sample."""

    def __init__(self):
        super().__init__()
        self.peak, self.ops = 0, 0

    def sample(self) -> int:
        v = live_bytes()
        self.peak = max(self.peak, v)
        return v

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.sample()
        return out


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def method_check() -> Dict[str, int]:
    """The tracker on a known pattern: 8 MiB + 16 MiB, free the 8, + 4 MiB (ones: pages touched)."""
    with PeakTracker():  # first use: imports and caches outside the measurement
        torch.ones(16)
    gc.collect()
    rss_ok = _reset_peak_rss()
    rss0, base = _proc_status_kib("VmRSS"), live_bytes()
    with PeakTracker() as tr:
        a = torch.ones(8 * MiB // 4)  # fp32: 8 MiB
        b = torch.ones(16 * MiB // 4)
        del a
        c = torch.ones(4 * MiB // 4)
        live = tr.sample() - base
    del b, c
    out = {"expected_peak": 24 * MiB, "peak": tr.peak - base, "expected_live": 20 * MiB, "live": live}
    if rss_ok:
        out["rss_peak"] = (_proc_status_kib("VmHWM") - rss0) * 1024
    return out


def measure_cpu(variant: str, cfg: dict) -> dict:
    dtype = getattr(torch, cfg["dtype"])
    check = method_check()
    model = build(variant, cfg, "cpu", dtype)
    B, S, C = cfg["batch"], cfg["seq"], cfg["dim"]
    # Warm-up, outside the measurement: the whole model on a short sequence (allocates the
    # .grad buffers), then the first attention and MLP sub-layers at the full shape (the BLAS
    # libraries keep per-shape buffers, about 4 MiB for each new matmul shape: not activations).
    x_small = torch.randn(1, min(S, 32), C, dtype=dtype, requires_grad=True)
    out = model(x_small)
    out.backward(torch.randn_like(out))
    del out, x_small
    x = torch.randn(B, S, C, dtype=dtype, requires_grad=True)
    model.warmup(x)
    grad_out = torch.randn(B, S, C, dtype=dtype)
    x.grad = torch.zeros_like(x)
    gc.collect()
    with PeakTracker():
        pass
    gc.collect()
    rss_ok = _reset_peak_rss()
    rss0, base = _proc_status_kib("VmRSS"), live_bytes()
    t0 = time.perf_counter()
    with PeakTracker() as tr:
        out = model(x)
        after_forward = tr.sample() - base
        t1 = time.perf_counter()
        fwd_ops = tr.ops
        out.backward(grad_out)
        del out
    t2 = time.perf_counter()
    gc.collect()
    row = dict(
        activation_peak_bytes=tr.peak - base,
        saved_after_forward_bytes=after_forward,
        after_backward_bytes=live_bytes() - base,
        fwd_s=t1 - t0,
        bwd_s=t2 - t1,
        ops_forward=fwd_ops,
        ops_total=tr.ops,
        method_check=check,
    )
    if rss_ok:
        row["rss_peak_bytes"] = (_proc_status_kib("VmHWM") - rss0) * 1024
    return row


def run_worker(variant: str, cfg: dict, threads: int) -> dict:
    """Runs measure_cpu(variant) in a fresh python with the MALLOC_* settings."""
    env = dict(os.environ, **MALLOC_ENV)
    env["PYTHONPATH"] = harness.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--worker", variant, "--worker-config", json.dumps(cfg),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=harness.REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_memory worker {variant} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------
# CUDA measurement (in this process)


def measure_cuda(variant: str, cfg: dict) -> dict:
    dev = torch.device("cuda")
    dtype = getattr(torch, cfg["dtype"])
    model = build(variant, cfg, dev, dtype)
    B, S, C = cfg["batch"], cfg["seq"], cfg["dim"]
    x = torch.randn(B, S, C, device=dev, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(B, S, C, device=dev, dtype=dtype)
    out = model(x)  # warm-up: .grad buffers, cuBLAS workspaces, kernels
    out.backward(grad_out)
    del out
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = model(x)
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated() - base
    t1 = time.perf_counter()
    out.backward(grad_out)
    del out
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    row = dict(
        activation_peak_bytes=torch.cuda.max_memory_allocated() - base,
        saved_after_forward_bytes=after_forward,
        after_backward_bytes=torch.cuda.memory_allocated() - base,
        fwd_s=t1 - t0,
        bwd_s=t2 - t1,
    )
    del model, x, grad_out
    gc.collect()
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------
# Report


def results_rows(cfg: dict, measured: Dict[str, dict]) -> List[dict]:
    rows = []
    for v in VARIANTS:
        m = measured[v]
        row = dict(
            variant=v,
            description=VARIANTS[v],
            tokens=cfg["tokens"],
            C=cfg["dim"],
            n=cfg["streams"] if v.startswith("mhc") else 1,
            sub_layers=cfg["sub_layers"],
            block_size=cfg["block_size"] if v in ("mhc_recompute", "residual_sac") else 0,  # 0: no recompute
            dtype=cfg["dtype"],
            activation_peak_mib=m["activation_peak_bytes"] / MiB,
            saved_after_forward_mib=m["saved_after_forward_bytes"] / MiB,
        )
        for base in ("residual", "residual_sac"):
            row[f"peak_vs_{base}"] = m["activation_peak_bytes"] / measured[base]["activation_peak_bytes"]
        for base in ("residual", "residual_sac"):
            row[f"saved_vs_{base}"] = m["saved_after_forward_bytes"] / measured[base]["saved_after_forward_bytes"]
        if "rss_peak_bytes" in m:
            row["rss_peak_mib"] = m["rss_peak_bytes"] / MiB
        row["measured"] = m
        rows.append(row)
    return rows


def table(rows: List[dict]) -> str:
    header = ["variant", "L_r", "activation peak MiB", "vs residual", "vs residual+SAC", "kept after forward MiB",
              "vs residual", "vs residual+SAC"]
    has_rss = all("rss_peak_mib" in r for r in rows)
    if has_rss:
        header.append("peak RSS increase MiB (cross-check)")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["description"], str(r["block_size"] or "-"), f"{r['activation_peak_mib']:.1f}",
                 f"{r['peak_vs_residual']:.2f}x", f"{r['peak_vs_residual_sac']:.2f}x",
                 f"{r['saved_after_forward_mib']:.1f}", f"{r['saved_vs_residual']:.2f}x",
                 f"{r['saved_vs_residual_sac']:.2f}x"]
        if has_rss:
            cells.append(f"{r['rss_peak_mib']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny shapes (C=64, 64 tokens, 2 layers): seconds")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/memory-<device>.json; "
                        "with --quick memory-<device>-quick.json)")
    p.add_argument("--dim", type=int, default=None, help="C (default 1024; --quick 64)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 16; --quick 4)")
    p.add_argument("--layers", type=int, default=None, help="layers of attention + MLP (default 12; --quick 2)")
    p.add_argument("--streams", type=int, default=None, help="n (default 4)")
    p.add_argument("--batch", type=int, default=None, help="default 4 (--quick 2)")
    p.add_argument("--seq", type=int, default=None, help="default 1024 (--quick 32)")
    p.add_argument("--block-size", type=int, default=None,
                   help="L_r (default: the paper's, round(sqrt(n L / (n + 2))))")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="branch / stream dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--worker", default=None, choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:  # a CPU measurement subprocess
        harness.set_threads(a.threads)
        print("RESULT " + json.dumps(measure_cpu(a.worker, json.loads(a.worker_config))), flush=True)
        return 0

    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    threads = harness.set_threads(a.threads) if a.device == "cpu" else None
    cfg = config(a.quick, a.device, a)
    meta = harness.metadata(a.device, threads)
    print(f"memory: {cfg['sub_layers']} sub-layers (attention + MLP), C={cfg['dim']}, n={cfg['streams']}, "
          f"{cfg['tokens']} tokens ({cfg['batch']} x {cfg['seq']}), {cfg['dtype']}, L_r={cfg['block_size']}",
          flush=True)
    checks = check_models(cfg, a.device)  # what is measured computes the right numbers
    measured = {}
    for v in VARIANTS:
        start = time.perf_counter()
        measured[v] = run_worker(v, cfg, threads) if a.device == "cpu" else measure_cuda(v, cfg)
        m = measured[v]
        print(f"  {v:14s} activation peak {m['activation_peak_bytes'] / MiB:9.1f} MiB, kept after forward "
              f"{m['saved_after_forward_bytes'] / MiB:9.1f} MiB ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = results_rows(cfg, measured)
    by = {r["variant"]: r for r in rows}
    ratio = by["mhc_recompute"]["peak_vs_residual"]
    summary = dict(
        goal=f"mhc_recompute activation peak <= {GOAL:.2f}x residual",
        mhc_recompute_vs_residual=ratio,
        mhc_recompute_vs_residual_sac=by["mhc_recompute"]["peak_vs_residual_sac"],
        mhc_vs_residual=by["mhc"]["peak_vs_residual"],
        goal_met=ratio <= GOAL,
        check=checks,
    )
    if a.device == "cpu":
        summary["method_check"] = measured["residual"]["method_check"]
    print(table(rows))
    print(f"mHC + recompute: {ratio:.2f}x the residual model's activation peak (goal <= {GOAL:.2f}x: "
          f"{'met' if ratio <= GOAL else 'NOT met'}); without recompute {by['mhc']['peak_vs_residual']:.2f}x")
    cfg_out = dict(benchmark="memory", quick=a.quick, variants=list(VARIANTS), **cfg,
                   method=("cuda max_memory_allocated" if a.device == "cuda" else
                           "glibc mallinfo2 sampled after every dispatched op, subprocess with " +
                           " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())))
    out = a.out or os.path.join(harness.RESULTS_DIR, f"memory-{a.device}{'-quick' if a.quick else ''}.json")
    harness.write_json(out, meta, rows, config=cfg_out, summary=summary)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
