"""The resources ptxas gives every CUDA kernel (registers, stack frame, spills), and a budget
check on the per-thread stack: every thread's stack is local memory that the driver reserves
for every resident thread of the device, outside PyTorch's caching allocator (16 KB per thread
is gigabytes on an H100), so a kernel's stack is a cost users pay even when it never runs.

    python -m benchmarks.ptxas_report              # table on stdout; exit 1 if over budget
    python -m benchmarks.ptxas_report --markdown   # the table as Markdown (benchmarks/RESULTS.md)

Compiles each csrc/<family>/<family>_kernels.cu (torch-free, so seconds each) for sm_90 with
`-Xptxas=-v` into a temporary directory; `make test` runs it when nvcc is present.

STACK_BUDGET is the largest stack frame any kernel may have, in bytes: 1280, just above the
fp64 n <= 8 paths that keep two n x n matrices per thread (1184 bytes for the mHC backward
epilogue). Kernels that work on an n x n matrix per thread keep it in local memory only up to
n = 8 (kThreadMatrixMaxN, csrc/include/hcext/dispatch.h) and in global memory beyond; before
that rule, the n <= 32 paths reserved 16.9 KB per thread (fp64), about 4.5 GB of an H100 while
such a kernel ran. SMEM_BUDGET is the static shared memory a block may declare (48 KB is the
hardware's static limit; hcext's reductions need a few hundred bytes).
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK_BUDGET = 1280
SMEM_BUDGET = 48 * 1024
ARCH = "sm_90"


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else (shutil.which("nvcc") or "")


def _demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    # void hcext::cuda::(anonymous namespace)::sinkhorn_backward_kernel<double, 0, 32>(double const*, ...)
    #   -> sinkhorn_backward_kernel<double, 0, 32>
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    name = name.split("(", 1)[0]
    name = re.sub(r"^(\w+::)+", "", name)
    return name.replace("__nv_bfloat16", "bf16")


def kernel_resources(source: str, nvcc: str, workdir: str) -> List[Dict]:
    cmd = [nvcc, "-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-arch={ARCH}", "-Xptxas=-v",
           "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "csrc", "include"), "-c", source,
           "-o", os.path.join(workdir, os.path.basename(source) + ".o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-3000:]}")
    rows, current = [], None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = {"kernel": m.group(1), "file": os.path.relpath(source, ROOT)}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            current["smem"] = int(m.group(1))
    for row, name in zip(rows, _demangle([r["kernel"] for r in rows])):
        row["kernel"] = _short(name)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    a = p.parse_args()
    nvcc = _nvcc()
    if not nvcc:
        print("ptxas_report: no nvcc found (set CUDA_HOME); nothing to check")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*_kernels.cu"))):
            rows += kernel_resources(source, nvcc, tmp)
    rows.sort(key=lambda r: (r["file"], -r.get("stack", 0), r["kernel"]))
    over = [r for r in rows if r.get("stack", 0) > STACK_BUDGET or r.get("smem", 0) > SMEM_BUDGET]
    if a.markdown:
        print(f"| kernel ({ARCH}) | file | registers | stack (bytes) | spill stores | spill loads | smem (bytes) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| `{r['kernel']}` | {r['file']} | {r.get('registers', '?')} | {r.get('stack', 0)} | "
                  f"{r.get('spill_stores', 0)} | {r.get('spill_loads', 0)} | {r.get('smem', 0)} |")
    else:
        print(f"{'registers':>9} {'stack':>6} {'spill st':>8} {'spill ld':>8} {'smem':>6}  kernel ({ARCH})")
        for r in rows:
            print(f"{r.get('registers', 0):9d} {r.get('stack', 0):6d} {r.get('spill_stores', 0):8d} "
                  f"{r.get('spill_loads', 0):8d} {r.get('smem', 0):6d}  {r['kernel']}")
    print(f"{len(rows)} kernels; largest stack {max((r.get('stack', 0) for r in rows), default=0)} bytes "
          f"(budget {STACK_BUDGET}); largest static smem {max((r.get('smem', 0) for r in rows), default=0)} bytes "
          f"(budget {SMEM_BUDGET})", file=sys.stderr)
    for r in over:
        print(f"over budget: {r['kernel']} ({r['file']}): stack {r.get('stack', 0)} bytes (budget {STACK_BUDGET}), "
              f"smem {r.get('smem', 0)} bytes (budget {SMEM_BUDGET})", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
