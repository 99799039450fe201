"""The emulated CUDA backend of the test suite, from Python.

``make test-emu`` builds ``build-emu/_emu*.so`` (tests/emu/CMakeLists.txt): hcext's CUDA glue
and kernels compiled for the emulated grid (tests/emu/cuda_emu.h) under AddressSanitizer, as
the test-only operator library ``hcext_emu`` (hcext's schemas, CPU tensors). This module loads
it (``HCEXT_EMU_BUILD`` names the folder) and routes hcext's own ops to it:

    with emulated():
        out = hcext.mhc_pre(x, phi, alpha, bias)   # CPU tensors, the CUDA path end to end

Inside ``emulated()``, every hcext op that has a CUDA kernel runs hcext_emu's instead of its CPU
kernel, for the whole call tree: public composites, autograd's backward ops, the drivers and
the glue, the kernels in the emulated grid. Everything else (fake kernels, autograd formulas,
references) is unchanged, so any test written for ``device`` runs against it (tests/conftest.py
adds an ``emu`` device when the build is loaded).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from typing import Dict, Iterator, List

import torch

import hcext  # noqa: F401  (registers torch.ops.hcext.*)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNEL_SOURCES = os.path.join(ROOT, "csrc")

_module = None


def build_dir() -> str:
    return os.path.abspath(os.environ.get("HCEXT_EMU_BUILD") or os.path.join(ROOT, "build-emu"))


def load():
    """The _emu module (loaded once). Raises with the way to build or run it."""
    global _module
    if _module is not None:
        return _module
    folder = build_dir()
    candidates = [f for f in os.listdir(folder) if f.startswith("_emu") and f.endswith(".so")] if os.path.isdir(folder) else []
    if not candidates:
        raise RuntimeError(f"no emulated backend in {folder}: build it with `make test-emu`")
    spec = importlib.util.spec_from_file_location("_emu", os.path.join(folder, candidates[0]))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise RuntimeError(
            f"cannot load the emulated backend ({e}); it is built with AddressSanitizer and must run with "
            "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0: use `make test-emu`"
        ) from e
    sys.modules["_emu"] = module
    _module = module
    return module


def kernel_ops() -> List[str]:
    """The hcext ops that have a CUDA kernel (registered in hcext_emu for CPU tensors)."""
    load()
    names = []
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("hcext_emu::"):
            if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"):
                names.append(qualified.split("::", 1)[1])
    return sorted(names)


def _route(name: str):
    target = getattr(torch.ops.hcext_emu, name)

    def kernel(*args, **kwargs):
        return target(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def emulated(seed: int = 0) -> Iterator[None]:
    """hcext's CUDA path for CPU tensors inside the block (the schedule seed: see cuda_emu.h)."""
    module = load()
    lib = torch.library.Library("hcext", "IMPL")
    previous = module.schedule_seed()
    try:
        for name in kernel_ops():
            lib.impl(name, _route(name), "CPU")
        module.set_schedule_seed(seed)
        yield
    finally:
        module.set_schedule_seed(previous)
        lib._destroy()


def executed_kernels() -> Dict[str, int]:
    """Kernel base name -> launches in the emulated grid since the module was loaded."""
    return dict(load().executed_kernels())


def source_kernels() -> Dict[str, str]:
    """Every ``__global__`` kernel in csrc/<family>/<family>_kernels.cu -> its file."""
    found = {}
    pattern = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")
    for family in sorted(os.listdir(KERNEL_SOURCES)):
        path = os.path.join(KERNEL_SOURCES, family, f"{family}_kernels.cu")
        if os.path.exists(path):
            with open(path) as f:
                for name in pattern.findall(f.read()):
                    found[name] = os.path.relpath(path, ROOT)
    return found
