"""One command for a machine with a GPU (``make gpu-check``): the checks that need a real
device, with their results written to benchmarks/results/gpu-check-<device>.json and .md.

    python -m benchmarks.gpu_check                  # everything (about 8 minutes on an H100)
    python -m benchmarks.gpu_check --only tests,graph

Checks (each reported as passed / failed / skipped with its details; the exit status is
non-zero when any failed):
  tests        every CUDA test of the suite (pytest -k cuda) with HCEXT_REQUIRE_CUDA=1
  sanitizer    compute-sanitizer memcheck, racecheck and synccheck on a small run of every op,
               forward and backward (this file's ``--worker small``)
  block-limit  the stream ops at tokens = 2^20 + 3 (past the grid cap: the kernels loop), the
               last tokens compared with the CPU
  huge         bf16 [65536, 4, 8192] (2^31 elements) through the stream ops, last token checked
  local-memory torch.cuda.mem_get_info around the first n = 32 fp64 Sinkhorn and mHC backward
               (per-thread local memory is reserved outside PyTorch's allocator)
  repeat       each backward 3 times at T = 16384, C = 4096, n = 4, bf16: torch.equal
  graph        CUDA-graph capture and replay of mhc_post_pre forward + backward
  bench        the stream-op and sub-layer benchmarks at T = 16384, C = 4096, n = 4, bf16
               against a same-size copy (bench_streams, bench_mhc, bench_boundary --device cuda)
Written before any GPU was lent to the project: the first run on a GPU is its own test.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHECKS = ["tests", "sanitizer", "block-limit", "huge", "local-memory", "repeat", "graph", "bench"]


def _run(cmd, env=None, timeout=None):
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-3000:]
    return proc.returncode, tail, time.time() - start


def _mhc_inputs(T, n, C, dtype, device, g):
    D = n * n + 2 * n
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(T, n, C, generator=g, device=device).to(dtype)
    f = torch.randn(T, C, generator=g, device=device).to(dtype)
    hp = torch.rand(T, n, generator=g, device=device).to(cd)
    hr = torch.rand(T, n, n, generator=g, device=device).to(cd)
    phi = (torch.randn(n * C, D, generator=g, device=device) * (n * C) ** -0.5).to(cd)
    alpha = torch.full((3,), 0.5, device=device, dtype=cd)
    bias = torch.randn(D, generator=g, device=device).to(cd)
    return f, x, hp, hr, phi, alpha, bias


def _fwd_bwd(op, inputs):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    outs = op(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def _pick(seq, *indices):
    return tuple(seq[i] for i in indices)


# ---- the checks


def check_tests(a):
    env = dict(os.environ, HCEXT_REQUIRE_CUDA="1")
    rc, tail, sec = _run([sys.executable, "-m", "pytest", "tests", "-q", "-x", "-k", "cuda", "-p", "no:cacheprovider"],
                         env=env, timeout=a.timeout)
    return ("passed" if rc == 0 else "failed"), {"seconds": round(sec), "tail": tail[-1500:]}


def check_sanitizer(a):
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        return "skipped", {"reason": "compute-sanitizer not found"}
    out, ok = {}, True
    for t in ("memcheck", "racecheck", "synccheck"):
        rc, tail, sec = _run([tool, "--tool", t, "--error-exitcode", "9", sys.executable, "-m", "benchmarks.gpu_check",
                              "--worker", "small"], timeout=a.timeout)
        out[t] = {"exit": rc, "seconds": round(sec), "tail": tail[-800:]}
        ok &= rc == 0
    return ("passed" if ok else "failed"), out


def worker_small():
    """Every op forward and backward once on small shapes (for compute-sanitizer)."""
    import hcext

    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, C in ((4, 64), (5, 7)):
            f, x, hp, hr, phi, alpha, bias = _mhc_inputs(37, n, C, dtype, "cuda", g)
            _fwd_bwd(hcext.ops.stream_aggregate, (x, hp))
            _fwd_bwd(hcext.ops.stream_mix_expand, (f, x, hp, hr))
            _fwd_bwd(hcext.ops.stream_mix_expand, (f, x, hp[0], hr[0]))
            _fwd_bwd(hcext.ops.mhc_pre, (x, phi, alpha, bias))
            _fwd_bwd(hcext.ops.mhc_post_pre, (f, x, hp, hr, phi, alpha, bias))
            _fwd_bwd(hcext.ops.mhc_post_pre_shifted, (f, x, hp, hr, hp, phi, alpha, bias))
            _fwd_bwd(lambda t: hcext.ops.sinkhorn(t, 20, 1e-6), (hr.float(),))
            K = C
            _fwd_bwd(hcext.ops.hc_coeffs, (x, torch.randn(n, n + 1, device="cuda"), torch.randn(n, device="cuda"),
                                           torch.randn(K, n + 1, device="cuda") * 0.1,
                                           torch.randn(K, device="cuda") * 0.1))
    torch.cuda.synchronize()


def check_block_limit(a):
    import hcext

    T, n, C = (1 << 20) + 3, 4, 8
    g = torch.Generator(device="cuda").manual_seed(1)
    f, x, hp, hr, *_ = _mhc_inputs(T, n, C, torch.float32, "cuda", g)
    got = _fwd_bwd(hcext.ops.stream_mix_expand, (f, x, hp, hr)) + _fwd_bwd(hcext.ops.stream_aggregate, (x, hp))
    tail = slice(T - 5, T)
    ref = _fwd_bwd(hcext.ops.stream_mix_expand, tuple(t[tail].cpu() for t in (f, x, hp, hr)))
    ref += _fwd_bwd(hcext.ops.stream_aggregate, tuple(t[tail].cpu() for t in (x, hp)))
    worst = max((a_[tail].cpu() - b).abs().max().item() for a_, b in zip(got, ref) if a_.dim() and a_.shape[0] == T)
    return ("passed" if worst < 1e-4 else "failed"), {"tokens": T, "max_abs_diff_last_tokens": worst}


def check_huge(a):
    import hcext

    T, n, C = 65536, 4, 8192  # 2^31 elements in x
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(T, n, C, generator=g, device="cuda", dtype=torch.bfloat16)
    f = torch.randn(T, C, generator=g, device="cuda", dtype=torch.bfloat16)
    hp, hr = torch.rand(T, n, generator=g, device="cuda"), torch.rand(T, n, n, generator=g, device="cuda")
    y = hcext.ops.stream_aggregate(x, hp)
    out = hcext.ops.stream_mix_expand(f, x, hp, hr)
    last = slice(T - 1, T)
    y_ref = hcext.ops.stream_aggregate(x[last].cpu(), hp[last].cpu())
    out_ref = hcext.ops.stream_mix_expand(f[last].cpu(), x[last].cpu(), hp[last].cpu(), hr[last].cpu())
    worst = max((y[last].cpu().float() - y_ref.float()).abs().max().item(),
                (out[last].cpu().float() - out_ref.float()).abs().max().item())
    return ("passed" if worst == 0 else "failed"), {"elements": x.numel(), "max_abs_diff_last_token": worst}


def check_local_memory(a):
    import hcext

    out = {}
    g = torch.Generator(device="cuda").manual_seed(3)
    for name, op, inputs in (
        ("sinkhorn n=32 fp64", lambda t: hcext.ops.sinkhorn(t, 20, 1e-6),
         (torch.randn(64, 32, 32, generator=g, device="cuda", dtype=torch.float64),)),
        ("mhc_pre n=32 fp64", hcext.ops.mhc_pre, _pick(_mhc_inputs(64, 32, 8, torch.float64, "cuda", g), 1, 4, 5, 6)),
    ):
        torch.cuda.synchronize()
        free_before, _ = torch.cuda.mem_get_info()
        _fwd_bwd(op, inputs)
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        out[name] = {"device_memory_taken_MiB": round((free_before - free_after) / 2**20, 1)}
    return "passed", out


def check_repeat(a):
    import hcext

    T, n, C = 16384, 4, 4096
    g = torch.Generator(device="cuda").manual_seed(4)
    f, x, hp, hr, phi, alpha, bias = _mhc_inputs(T, n, C, torch.bfloat16, "cuda", g)
    out, ok = {}, True
    for name, op, inputs in (("stream_aggregate", hcext.ops.stream_aggregate, (x, hp)),
                             ("stream_mix_expand", hcext.ops.stream_mix_expand, (f, x, hp, hr)),
                             ("mhc_pre", hcext.ops.mhc_pre, (x, phi, alpha, bias)),
                             ("mhc_post_pre", hcext.ops.mhc_post_pre, (f, x, hp, hr, phi, alpha, bias))):
        runs = [_fwd_bwd(op, inputs) for _ in range(3)]
        same = all(torch.equal(p, q) for r in runs[1:] for p, q in zip(runs[0], r))
        out[name] = "bitwise equal" if same else "DIFFERS"
        ok &= same
    return ("passed" if ok else "failed"), out


def check_graph(a):
    import hcext

    g = torch.Generator(device="cuda").manual_seed(5)
    inputs = [t.requires_grad_(True) for t in _mhc_inputs(512, 4, 256, torch.bfloat16, "cuda", g)]

    def step():
        outs = hcext.ops.mhc_post_pre(*inputs)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(p, q) for p, q in zip(eager, captured))
    return ("passed" if same else "failed"), {"replay_equals_eager": same}


def check_bench(a):
    out, ok = {}, True
    for name, args in (("streams", ["--tokens", "16384", "--channels", "4096", "--dtypes", "bfloat16"]),
                       ("mhc", []), ("boundary", [])):
        dest = RESULTS / f"{name}-cuda.json"
        rc, tail, sec = _run([sys.executable, "-m", f"benchmarks.bench_{name}", "--device", "cuda", *args,
                              "--out", str(dest)], timeout=a.timeout)
        out[name] = {"exit": rc, "seconds": round(sec), "json": str(dest.relative_to(ROOT)), "tail": tail[-600:]}
        ok &= rc == 0
    return ("passed" if ok else "failed"), out


def environment():
    def smi(q):
        try:
            return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except OSError:
            return None

    import hcext

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "driver": smi("driver_version"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "hcext_build": hcext.build_info()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--timeout", type=int, default=600, help="seconds per subprocess (default 600)")
    p.add_argument("--worker", choices=["small"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_small()
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    report = {"environment": environment(), "checks": {}}
    for name in a.only.split(","):
        fn = globals()["check_" + name.replace("-", "_")]
        start = time.time()
        try:
            status, details = fn(a)
        except Exception:  # a crash of one check is its result, not the end of the run
            status, details = "failed", {"exception": traceback.format_exc()[-2000:]}
        details = dict(details, seconds_total=round(time.time() - start))
        report["checks"][name] = {"status": status, "details": details}
        print(f"{name}: {status} ({details['seconds_total']} s)", flush=True)
    tag = report["environment"]["device"].replace(" ", "-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gpu-check-{tag}.json").write_text(json.dumps(report, indent=2))
    env = report["environment"]
    lines = [f"# GPU check: {env['device']}", "",
             f"{env['date']}; driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}.", "",
             "| check | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['details']['seconds_total']} |" for k, v in report["checks"].items()]
    (RESULTS / f"gpu-check-{tag}.md").write_text("\n".join(lines) + "\n")
    return 0 if all(v["status"] != "failed" for v in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
