"""Build hcext._C: the hcext operator library (CPU kernels, plus CUDA kernels when possible).

Whether CUDA kernels are built is decided by the toolchain, never by the presence of a GPU:
a GPU-less CI machine with nvcc and a CUDA build of torch compiles them.

Environment:
  HCEXT_USE_CUDA=auto|0|1  auto (default): build CUDA when CUDA_HOME is found and torch is a
                           CUDA build; 0: CPU only; 1: CUDA or fail loudly.
  CUDA_HOME                the CUDA toolkit; default: resolved from the real path of nvcc.
  TORCH_CUDA_ARCH_LIST     CUDA archs; default "9.0" (H100/H200) when unset and no GPU is visible.
  MAX_JOBS                 parallel compile jobs (default: cores, at most one per ~6 GB RAM).
  DEBUG=1                  -O0 -g (and -lineinfo for nvcc) instead of -O3 -g0.
  CCACHE=0                 do not let torch wrap the compilers with ccache when it is installed.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _resolve_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    # The toolkit root must hold include/cuda_runtime.h and lib64/libcudart: nvcc may be a
    # wrapper script on PATH (here /usr/local/bin/nvcc), so CUDA_HOME=/usr/local would fail.
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


_cuda_home = _resolve_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # torch.utils.cpp_extension reads it at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
USE_CUDA = os.environ.get("HCEXT_USE_CUDA", "auto").lower()
DEBUG = os.environ.get("DEBUG", "0") == "1"

if USE_CUDA not in ("auto", "0", "1"):
    sys.exit(f"HCEXT_USE_CUDA must be auto, 0 or 1, got {USE_CUDA!r}")

can_build_cuda = bool(_cuda_home) and torch.version.cuda is not None
if USE_CUDA == "1" and not can_build_cuda:
    sys.exit(
        "HCEXT_USE_CUDA=1 but CUDA cannot be built: "
        f"CUDA_HOME={_cuda_home!r}, torch.version.cuda={torch.version.cuda!r} "
        "(install a CUDA build of torch and the CUDA toolkit, or set CUDA_HOME)"
    )
WITH_CUDA = can_build_cuda and USE_CUDA != "0"

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # With no GPU visible, torch would otherwise build an empty arch list and fail.
    if torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

if not os.environ.get("MAX_JOBS"):
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 6))))

if os.environ.get("CCACHE", "1") == "0":
    # torch >= 2.13 prefixes the compilers with ccache when it is installed.
    os.environ["TORCH_NO_COMPILER_WRAPPER"] = "1"


def _sources():
    # csrc/hcext.cpp, then per family csrc/<family>/: <family>_ops.cpp (schemas),
    # <family>_cpu.cpp, and with CUDA <family>_cuda.cpp and <family>_kernels.cu.
    srcs = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*/*.cpp"))
    if not WITH_CUDA:
        srcs = [s for s in srcs if not s.endswith("_cuda.cpp")]
    else:
        srcs += sorted(glob.glob("csrc/*/*.cu"))
    return srcs


def _headers():
    # setuptools rebuilds the extension only when a source or one of these is newer than it
    # (ninja then recompiles only the translation units whose inputs changed).
    return sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))


def _extension():
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""
    macros = [("HCEXT_CUDA_ARCH_LIST_TOKENS", arch_list.replace(";", ",").replace(" ", ",") or "none")]
    if WITH_CUDA:
        macros.append(("HCEXT_WITH_CUDA", None))
    opt = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    if not DEBUG:
        macros.append(("NDEBUG", None))
    cxx = opt + ["-Wall", "-Wno-unknown-pragmas", "-fvisibility=hidden"]
    # at::parallel_for is an inline template that only spreads work over threads when the
    # including translation unit is compiled with OpenMP (torch's own CPU build uses OpenMP
    # and ships libgomp, which the extension then shares at run time).
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    nvcc = (["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3"]) + ["--expt-relaxed-constexpr", "-Xcompiler", "-fvisibility=hidden"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(
        name="hcext._C",
        sources=_sources(),
        depends=_headers(),
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if WITH_CUDA else {"cxx": cxx},
        extra_link_args=link,
    )
    return CUDAExtension(**kwargs) if WITH_CUDA else CppExtension(**kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
