"""hcext: fused kernels for Hyper-Connections (HC) and Manifold-Constrained
Hyper-Connections (mHC) as torch custom ops.

Importing hcext loads the native library (registering ``torch.ops.hcext.*`` for
every compiled backend) and ``hcext.ops`` (fake kernels and autograd).
"""

import torch  # noqa: F401  (torch must be loaded before the native library)

from . import _C  # noqa: F401  (registers the ops)
from . import ops, reference  # noqa: F401
from .ops import sinkhorn
from .ops import stream_aggregate, stream_mix_expand
from . import init  # noqa: F401  (Hyper-Connections initial values)
from .ops import hc_coeffs

__all__ = ["build_info", "has_cuda", "ops", "reference", "sinkhorn", "stream_aggregate", "stream_mix_expand", "init", "hc_coeffs"]
__version__ = "0.1.0"


def build_info() -> dict:
    """What the native library was compiled with.

    Keys: ``backends`` (e.g. ``["cpu", "cuda"]``), ``torch_version`` (the torch the
    library was built against), ``cuda_version`` (the CUDA toolkit, or None),
    ``cuda_arch_list`` (TORCH_CUDA_ARCH_LIST at build time, or None), ``debug``.
    """
    return dict(_C.build_info())


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled (whether or not a GPU is present)."""
    return "cuda" in _C.build_info()["backends"]
