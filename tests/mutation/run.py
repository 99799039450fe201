"""The mutation-test gate: plants each bug of mutants.py in turn, rebuilds what changed,
runs the tests that should catch it, and reports which mutants the suite killed.

    python -m tests.mutation.run                 # every mutant (make mutation-test)
    python -m tests.mutation.run --only tanh     # the mutants whose name contains "tanh"
    python -m tests.mutation.run --list

A C++ mutant costs one incremental rebuild, CPU kernels only, of the translation units that
include the mutated file (ccache makes the rebuild after restoring it a cache hit), a
Python mutant none. A mutant that does not compile is reported as invalid (fix the list), not as killed.
The tree is restored after every mutant, also on failure or Ctrl-C, and rebuilt at the end.
Not part of CI: it takes tens of minutes. Results: tests/mutation/results.md.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results.md"


def build(cpu_only: bool = True) -> bool:
    # The mutants' tests run on the CPU: building only the CPU kernels keeps a mutated
    # shared header from recompiling the CUDA sources too.
    env = dict(os.environ, HCEXT_USE_CUDA="0") if cpu_only else None
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    return proc.returncode == 0


def run_tests(tests, timeout: int) -> str:
    """'killed' when the tests fail, 'survived' when they pass, 'timeout' otherwise."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout (counted as killed)"
    if proc.returncode in (1, 2, 3):  # test failures, interruption, internal error: the bug was seen
        return "killed"
    if proc.returncode < 0:  # the tests crashed the interpreter (e.g. a write out of bounds)
        return f"killed (crash: signal {-proc.returncode})"
    if proc.returncode == 0:
        return "survived"
    return f"no tests ran (pytest exit {proc.returncode})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="run the mutants whose name contains this text")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run (default 900)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = p.parse_args()
    # A kill (SIGTERM) unwinds like Ctrl-C, so that the mutated file is restored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    mutants = [m for m in MUTANTS if a.only is None or a.only in m.name]
    if a.list:
        for m in mutants:
            print(f"{m.path:36s} {m.name}")
        return 0
    env_note = f"python {sys.version.split()[0]}, {os.cpu_count()} cores"
    rows, killed, valid = [], 0, 0
    for i, m in enumerate(mutants, 1):
        path = ROOT / m.path
        original = path.read_text()
        count = original.count(m.find)
        if count != 1:
            rows.append((m, f"invalid: snippet found {count} times", 0.0))
            print(f"[{i}/{len(mutants)}] {m.name}: invalid (snippet found {count} times)", flush=True)
            continue
        start = time.time()
        native = m.path.startswith("csrc/")
        try:
            path.write_text(original.replace(m.find, m.replace))
            if native and not build():
                outcome = "invalid: does not compile"
            else:
                outcome = run_tests(m.tests, a.timeout)
        finally:
            path.write_text(original)
            if native and not build():  # the next mutant must not run against this one's binary
                print("warning: the rebuild of the restored tree failed", flush=True)
        elapsed = time.time() - start
        if not outcome.startswith(("invalid", "no tests")):
            valid += 1
            killed += outcome != "survived"
        rows.append((m, outcome, elapsed))
        print(f"[{i}/{len(mutants)}] {m.name}: {outcome} ({elapsed:.0f} s)", flush=True)
    if not build(cpu_only=False):  # the restored tree, built as the environment asks
        print("warning: the rebuild of the restored tree failed", flush=True)
    lines = [
        "# Mutation-test gate: results",
        "",
        f"{killed} of {valid} valid mutants killed ({len(rows)} listed); {time.strftime('%Y-%m-%d')}, {env_note}.",
        "Regenerate with `make mutation-test` (tests/mutation/run.py; the mutants: tests/mutation/mutants.py).",
        "",
        "| mutant | file | tests | outcome | seconds |",
        "|---|---|---|---|---|",
    ]
    for m, outcome, elapsed in rows:
        lines.append(f"| {m.name} | `{m.path}` | {', '.join(m.tests)} | {outcome} | {elapsed:.0f} |")
    if a.only is None:
        RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:3]))
    return 0 if killed == valid else 1


if __name__ == "__main__":
    sys.exit(main())
