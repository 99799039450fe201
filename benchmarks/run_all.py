"""Runs every benchmark (benchmarks/bench_*.py), then regenerates the report (benchmarks/report.py).

    python -m benchmarks [--device cpu|cuda] [--threads N] [--quick] [--no-compile]
                         [--repeats N] [--warmup N] [--only NAME ...] [--results-dir DIR]
                         [--report PATH] [--no-report] [--no-charts] [--list]

Benchmarks are found by file name, bench_<name>.py, so a new one is picked up as soon as it
exists. Each must expose ``main(argv)`` with an argparse command line that takes ``--out PATH``
(where its JSON goes). The common options are passed only to the benchmarks that accept them,
found by reading the ``add_argument("--...")`` calls in the file (without importing it): a
benchmark without --device is skipped on cuda, one without --quick is skipped by --quick.

Each writes <results-dir>/<name>-<device>[-<N>thread(s)].json, the names of RESULTS.md's
regions: mhc-cpu.json for the default thread count (all cores), mhc-cpu-1thread.json for
--threads 1. --quick (tiny smoke runs, seconds each) writes to benchmarks/results/quick/ unless
given --results-dir (ignored by git; its report is <that dir>/RESULTS.md), so that it never
replaces measured results.

The benchmarks run in this process, one after another. One that fails is reported and the
rest still run; the exit status is 1 when any failed. OpenMP settings such as
OMP_WAIT_POLICY=PASSIVE (see RESULTS.md) must be set in the environment before the start.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib
import os
import sys
import time
import traceback
from typing import Dict, List, Optional, Set, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, report  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
QUICK_DIR = os.path.join(harness.RESULTS_DIR, "quick")


def discover() -> Dict[str, str]:
    """{name: path} of every benchmarks/bench_<name>.py, in report order."""
    found = {os.path.basename(p)[len("bench_"):-len(".py")]: p for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py"))}
    order = report.ORDER
    return dict(sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def accepted_options(path: str) -> Set[str]:
    """The --options of a benchmark's command line: the string arguments of its add_argument
    calls. Read from the source so that listing and checking need no import (nor the build)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    options = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options.update(a.value for a in node.args
                           if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--"))
    return options


def output_name(name: str, device: str, threads: Optional[int]) -> str:
    """<name>-<device>[-<N>thread(s)].json; no suffix for the benchmarks' default thread count
    (os.cpu_count()) or on cuda."""
    suffix = ""
    if device == "cpu" and threads is not None and threads != os.cpu_count():
        suffix = f"-{threads}thread" + ("" if threads == 1 else "s")
    return f"{name}-{device}{suffix}.json"


def bench_argv(name: str, options: Set[str], args: argparse.Namespace, results_dir: str) -> Tuple[Optional[List[str]], str]:
    """(argv for the benchmark's main, "") or (None, why it is skipped)."""
    if "--out" not in options:
        return None, "its command line has no --out, so its JSON could not be put in the results directory"
    argv = []
    if "--device" in options:
        argv += ["--device", args.device]
    elif args.device != "cpu":
        return None, "no --device option (CPU only)"
    if args.quick:
        if "--quick" not in options:
            return None, "no --quick mode"
        argv.append("--quick")
    for option, value in (("--threads", args.threads), ("--repeats", args.repeats), ("--warmup", args.warmup)):
        if value is not None and option in options:  # otherwise the benchmark's own default
            argv += [option, str(value)]
    if args.no_compile and "--no-compile" in options:
        argv.append("--no-compile")
    argv += ["--out", os.path.join(results_dir, output_name(name, args.device, args.threads))]
    return argv, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: each benchmark's, all cores)")
    p.add_argument("--quick", action="store_true", help="tiny smoke runs (into benchmarks/results/quick/ by default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per variant (default: each benchmark's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default: each benchmark's)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these benchmarks (e.g. mhc block; bench_mhc and mhc,block work too)")
    p.add_argument("--results-dir", "--out-dir", default=None,
                   help="where the JSON files go (default benchmarks/results, with --quick benchmarks/results/quick)")
    p.add_argument("--report", default=None,
                   help="the markdown report to update (default: benchmarks/RESULTS.md, and the README's summary, for "
                        "the default results directory; else <results-dir>/RESULTS.md)")
    p.add_argument("--no-report", action="store_true", help="don't regenerate the report")
    p.add_argument("--no-charts", action="store_true", help="report without drawing PNG charts")
    p.add_argument("--list", action="store_true", help="list the benchmarks and the options they accept, then exit")
    args = p.parse_args(argv)

    benches = discover()
    if args.list:
        for name, path in benches.items():
            print(f"{name:10s} {os.path.relpath(path)}  {' '.join(sorted(accepted_options(path)))}")
        return 0
    if args.only:
        wanted = [w.removeprefix("bench_") for item in args.only for w in item.split(",") if w]
        unknown = [w for w in wanted if w not in benches]
        if unknown:
            p.error(f"--only: no benchmark named {', '.join(unknown)} (have: {', '.join(benches)})")
        benches = {name: path for name, path in benches.items() if name in wanted}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device available")

    results_dir = args.results_dir or (QUICK_DIR if args.quick else harness.RESULTS_DIR)
    os.makedirs(results_dir, exist_ok=True)
    failed = []
    for name, path in benches.items():
        bargv, why = bench_argv(name, accepted_options(path), args, results_dir)
        if bargv is None:
            print(f"== {name}: skipped: {why}", flush=True)
            continue
        print(f"== {name}: python -m benchmarks.bench_{name} {' '.join(bargv)}", flush=True)
        start = time.perf_counter()
        try:
            importlib.import_module(f"benchmarks.bench_{name}").main(bargv)
        except SystemExit as e:  # argparse errors and p.error() in the benchmark
            if e.code not in (None, 0):
                failed.append(name)
                print(f"== {name}: exited with status {e.code}", file=sys.stderr)
        except Exception:  # keep going: one broken benchmark should not cost the others' results
            traceback.print_exc()
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)

    if not args.no_report:
        rargv = ["--results-dir", results_dir] + (["--out", args.report] if args.report else [])
        report.main(rargv + (["--no-charts"] if args.no_charts else []))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
