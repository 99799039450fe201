"""Deliberately broken copies of the CUDA kernels must fail the emulated tests.

For each mutant below: a copy of the repository (tracked files + the built hcext/_C*.so) with one
textual change in a kernel source, the emulated backend built from it (ccache makes this ~1 min),
then the C++ ThreadSanitizer test and `pytest tests/emu -x`. The mutant is *caught* when either
fails. Writes tests/emu/broken_kernels.md.

    python tests/emu/broken_kernels.py        (needs the build of `make test-emu`'s prerequisites)
"""

from __future__ import annotations

import datetime
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, file, original text, broken text)
MUTANTS = [
    ("block_sum without its first __syncthreads", "csrc/common/cuda_utils.cuh",
     "  __syncthreads();\n  for (int k = threadIdx.x; k < count; k += blockDim.x) {",
     "  for (int k = threadIdx.x; k < count; k += blockDim.x) {"),
    ("block_sum's warp shuffle offset 16 -> 15", "csrc/common/cuda_utils.cuh",
     "for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);",
     "for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset == 16 ? 15 : offset);"),
    ("aggregate_forward tail bound off by one (idx <= total)", "csrc/streams/streams_kernels.cu",
     "  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;\n       idx += int64_t(gridDim.x) * blockDim.x) {\n    const int64_t t = idx / groups;\n    const int64_t c = (idx - t * groups) * VEC;\n    const T* xt = x + t * n * C + c;\n    const V yv",
     "  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx <= total;\n       idx += int64_t(gridDim.x) * blockDim.x) {\n    const int64_t t = idx / groups;\n    const int64_t c = (idx - t * groups) * VEC;\n    const T* xt = x + t * n * C + c;\n    const V yv"),
    ("128-bit path taken for unaligned pointers (can_vectorize ignores the pointers)", "csrc/common/cuda_utils.cuh",
     "    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;",
     "    (void)p;"),
]


def _copy_repo(dst: str) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "hcext", "_C*.so"))]
    for rel in files:
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))


def _first_report(text: str) -> str:
    """The most telling line of a failure: a sanitizer's summary, the emulator's error, an
    assertion, or pytest's first FAILED line."""
    lines = text.splitlines()
    for keys in (("SUMMARY: ",), ("ERROR: AddressSanitizer", "runtime error"), ("hcext_emu", "emulated CUDA launch"),
                 ("E   ",), ("FAILED", "FAIL ")):
        for line in lines:
            if any(k in line for k in keys):
                return line.strip()[:220]
    return ""


def _run(cmd, cwd, env=None, timeout=1800):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str))
    return p.returncode, p.stdout + p.stderr


def main() -> int:
    py = sys.executable
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    rows = []
    for name, rel, old, new in MUTANTS:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix="hcext-mutant-") as tmp:
            _copy_repo(tmp)
            path = os.path.join(tmp, rel)
            text = open(path).read()
            assert text.count(old) == 1, f"{name}: the original text is not found once in {rel}"
            open(path, "w").write(text.replace(old, new))
            build = os.path.join(tmp, "build-emu")
            rc, out = _run(f"cmake -S tests/emu -B {build} -G Ninja -DPython3_EXECUTABLE={py} -DCUDA_HOME={cuda_home}"
                           f" && cmake --build {build}", tmp)
            if rc != 0:
                rows.append((name, rel, "build failed", out.strip().splitlines()[-1][:200], time.time() - start))
                continue
            rc_c, out_c = _run([os.path.join(build, "test_emu_kernels")], tmp,
                               env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1:exitcode=66",
                                    "UBSAN_OPTIONS": "halt_on_error=1"})
            gxx = lambda lib: subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()  # noqa: E731
            env = {**os.environ, "HCEXT_EMU_BUILD": build, "LD_PRELOAD": f"{gxx('libasan.so')} {gxx('libstdc++.so')}",
                   "ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=1",
                   "UBSAN_OPTIONS": "halt_on_error=1", "PYTHONPATH": tmp}
            rc_p, out_p = _run([py, "-m", "pytest", "tests/emu", "-x", "-q", "-p", "no:cacheprovider", "--capture=sys"], tmp,
                               env=env)
            caught = rc_c != 0 or rc_p != 0
            first = _first_report(out_c + "\n" + out_p)
            rows.append((name, rel, f"caught (C++ TSan test rc={rc_c}, pytest rc={rc_p})" if caught else "SURVIVED",
                         first, time.time() - start))
        print(rows[-1], flush=True)
    machine = platform.processor() or platform.machine()
    with open(os.path.join(ROOT, "tests", "emu", "broken_kernels.md"), "w") as f:
        f.write(f"# Broken kernels against `make test-emu` ({datetime.date.today()}, {machine})\n\n")
        f.write("Written by `python tests/emu/broken_kernels.py`. Each row: one change to a copy of the sources, "
                "the emulated backend rebuilt, the C++ ThreadSanitizer test and `pytest tests/emu -x` run.\n\n")
        f.write("| mutant | file | result | first report | seconds |\n|---|---|---|---|---|\n")
        for name, rel, result, first, secs in rows:
            f.write(f"| {name} | {rel} | {result} | `{first.replace('|', '/')}` | {secs:.0f} |\n")
    return 0 if all(r[2].startswith("caught") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
