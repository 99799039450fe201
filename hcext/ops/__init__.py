"""Thin Python wrappers of ``torch.ops.hcext.*``, with their fake kernels (for
torch.compile / export) and autograd formulas. The kernels themselves are C++/CUDA
(csrc/); the readable definition of each op is in hcext/reference.py.

Layout: one module per op family, each with the family's public wrappers, the fake
kernel of every op of the family (forward and backward ops) and its autograd formulas:

    sinkhorn.py   sinkhorn
    streams.py    stream_aggregate, stream_mix_expand
    mhc.py        mhc_coeffs, mhc_pre, mhc_post_pre, mhc_pre_shifted, mhc_post_pre_shifted
    hc.py         hc_coeffs

_checks.py is what the families share: the compute-dtype rule (``compute_dtype``) and the
argument checks that mirror the C++ ones.

Importing this package registers every fake kernel and autograd formula. The C++ library
names this package as its ops' Python module (``m.set_python_module("hcext.ops")``):
torch imports it to find a missing fake kernel, and requires ``register_fake`` to be
called from here, so the families declare their fakes (``_checks.fake_kernel``) and
this module registers them.
"""

import torch

from ._checks import FAKE_KERNELS, compute_dtype  # noqa: F401  (compute_dtype: the one rule, for hcext.nn)
from .sinkhorn import sinkhorn
from .streams import stream_aggregate, stream_mix_expand
from .mhc import mhc_coeffs, mhc_post_pre, mhc_post_pre_shifted, mhc_pre, mhc_pre_shifted
from .hc import hc_coeffs

__all__ = [
    "sinkhorn", "stream_aggregate", "stream_mix_expand", "mhc_coeffs", "mhc_pre", "mhc_post_pre", "mhc_pre_shifted",
    "mhc_post_pre_shifted", "hc_coeffs",
]

for _qualname, _fake in FAKE_KERNELS:
    torch.library.register_fake(_qualname, _fake)
del _qualname, _fake

# DTensor sharding rules (hcext/ops/_sharding.py): registered when torch.distributed.tensor
# is imported (now, if it already is), so that `import hcext` does not import it.
from . import _sharding  # noqa: E402

_sharding.register_when_dtensor_imported()
