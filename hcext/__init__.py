"""hcext: fused kernels for Hyper-Connections (HC) and Manifold-Constrained
Hyper-Connections (mHC) as torch custom ops.

Importing hcext loads the native library (registering ``torch.ops.hcext.*`` for
every compiled backend), ``hcext.ops`` (fake kernels and autograd) and ``hcext.nn``
(the modules), like ``import torch`` makes ``torch.nn`` available.
"""

import torch  # noqa: F401  (torch must be loaded before the native library)

from . import _C  # noqa: F401  (registers the ops)
from . import ops, reference  # noqa: F401
from . import init  # noqa: F401  (Hyper-Connections initial values)
from . import nn  # noqa: F401  (after ops and init, which it uses)
from .ops import (
    hc_coeffs,
    mhc_coeffs,
    mhc_post_pre,
    mhc_post_pre_shifted,
    mhc_pre,
    mhc_pre_shifted,
    sinkhorn,
    stream_aggregate,
    stream_mix_expand,
)

__all__ = [
    "build_info", "has_cuda", "ops", "reference", "init", "nn",
    "sinkhorn", "stream_aggregate", "stream_mix_expand", "mhc_coeffs", "mhc_pre", "mhc_post_pre", "mhc_pre_shifted",
    "mhc_post_pre_shifted", "hc_coeffs",
]
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
