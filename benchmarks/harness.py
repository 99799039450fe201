"""Shared benchmark harness for the hcext op benchmarks (benchmarks/bench_<op>.py).

What it does, and why:

* ``time_interleaved`` times several variants of one computation (hcext kernel, eager
  reference, compiled reference, ...) *interleaved*: one sample of each variant per round,
  the order rotated every round, rather than all samples of A and then all of B. The
  machines this runs on are noisy (other jobs, random stalls); interleaving spreads a
  slow period over every variant instead of penalising whichever ran during it.
* Each sample is one call (or ``inner`` calls averaged, for calls too short for the
  timer). On CUDA the time comes from CUDA events around the calls, after a synchronize;
  on CPU from ``time.perf_counter``.
* Warm-up calls run first (and absorb one-time costs: torch.compile, allocator growth).
  The callables should use pre-allocated inputs (and gradient buffers), so that no sample
  pays for page faults on fresh large allocations.
* Statistics are min, median and the inter-quartile range (IQR) of the samples, in ms.
* ``set_threads`` fixes the CPU thread count (recorded in the metadata); ``metadata``,
  ``markdown_table`` and ``write_json`` produce the reports.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

CPU_TIMING_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "HCEXT_CPU_ISA", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


# ---------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Samples of one variant, in milliseconds per call."""

    samples_ms: List[float] = field(default_factory=list)
    inner: int = 1  # calls per sample

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def q1(self) -> float:
        return _quantile(self.samples_ms, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples_ms, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def summary(self) -> Dict[str, float]:
        return {
            "min_ms": self.min,
            "median_ms": self.median,
            "q1_ms": self.q1,
            "q3_ms": self.q3,
            "iqr_ms": self.iqr,
            "repeats": len(self.samples_ms),
            "inner": self.inner,
        }


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Milliseconds per call of ``inner`` back-to-back calls of fn."""
    device = torch.device(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def time_interleaved(
    variants: Mapping[str, Callable[[], object]],
    device,
    repeats: int = 10,
    warmup: int = 2,
    min_sample_ms: float = 0.0,
    max_inner: int = 1000,
    max_time_s: Optional[float] = None,
    min_repeats: int = 3,
) -> Dict[str, Timing]:
    """Times every variant ``repeats`` times, interleaved (one sample of each per round,
    the order rotated each round) after ``warmup`` untimed calls of each.

    min_sample_ms > 0 makes each sample at least that long by timing ``inner`` calls
    (inner chosen per variant from the last warm-up call, at most max_inner): useful for
    calls of a few microseconds. max_time_s stops after the round that exceeds it (timed
    rounds only; at least min_repeats rounds), so that slow baselines cannot take hours.
    Returns {name: Timing}.
    """
    device = torch.device(device)
    names = list(variants)
    inner = {}
    for name in names:
        fn = variants[name]
        last = float("inf")
        for _ in range(max(1, warmup)):
            last = time_calls(fn, device)
        inner[name] = 1
        if min_sample_ms > 0 and last < min_sample_ms:
            inner[name] = int(min(max_inner, math.ceil(min_sample_ms / max(last, 1e-6))))
    timings = {name: Timing(inner=inner[name]) for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            timings[name].samples_ms.append(time_calls(variants[name], device, inner[name]))
        if max_time_s is not None and r + 1 >= min_repeats and time.perf_counter() - start > max_time_s:
            break
    return timings


def set_threads(threads: Optional[int] = None) -> int:
    """Fixes torch's intra-op CPU thread count (default: os.cpu_count()); returns it."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def speedup(baseline: Timing, candidate: Timing, stat: str = "median") -> float:
    """How many times faster candidate is than baseline (>1: candidate is faster)."""
    return getattr(baseline, stat) / getattr(candidate, stat)


# ---------------------------------------------------------------------------------------
# Reports


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_simd() -> List[str]:
    """The SIMD extensions the hcext CPU kernels can use on this CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl") if f in flags]


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> Optional[str]:
    """HEAD of the repository, with "-dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def metadata(device, threads: Optional[int] = None) -> Dict[str, object]:
    """Where and with what a benchmark ran."""
    import hcext

    device = torch.device(device)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "hcext_version": getattr(hcext, "__version__", None),
        "hcext_build_info": hcext.build_info(),
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        # 1/5/15-minute load averages when the run started: other jobs on the machine.
        "loadavg_start": loadavg(),
        # Settings that change CPU timings (None: unset). The glibc malloc settings decide
        # whether a fresh x-sized output is a new mmap (page faults on first write) or
        # reused heap memory: see RESULTS.md, "Method".
        "env": {k: os.environ.get(k) for k in CPU_TIMING_ENV},
    }
    if device.type == "cpu":
        meta["cpu_simd"] = _cpu_simd()
    else:
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
    return meta


def fmt_ms(t: Optional[Timing]) -> str:
    """'median (min)' in ms with 3 significant digits, or '-' for a variant not run."""
    if t is None:
        return "-"
    return f"{_sig(t.median)} ({_sig(t.min)})"


def _sig(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def markdown_table(
    rows: Iterable[Tuple[Sequence[str], Mapping[str, Timing]]],
    key_columns: Sequence[str],
    variants: Sequence[str],
    ratios: Sequence[Tuple[str, str, str]] = (),
) -> str:
    """A markdown table: the key columns, 'median (min)' ms of every variant, then one
    speed-up column per (label, baseline, candidate) in ``ratios`` (baseline median /
    candidate median: how many times faster the candidate is).

    rows: (key values, {variant: Timing}); a variant missing from a row shows '-'.
    """
    header = list(key_columns) + [f"{v} ms" for v in variants] + [label for label, _, _ in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for keys, timings in rows:
        cells = list(keys) + [fmt_ms(timings.get(v)) for v in variants]
        for _, base, cand in ratios:
            if base in timings and cand in timings:
                cells.append(f"{speedup(timings[base], timings[cand]):.1f}x")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, meta: Mapping[str, object], results: List[Mapping[str, object]], **extra) -> str:
    """Writes {"metadata": meta, **extra, "results": results} to path (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"metadata": dict(meta), **extra, "results": list(results)}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
