"""Helpers shared by the hcext test files: the dtype tolerance table, comparisons and
device markers. Imported as ``helpers`` (pytest puts tests/ on sys.path because the
folder has no __init__.py).
"""

import pytest
import torch

# The one tolerance table of the suite, keyed by the dtype of the tensors compared.
# fp32: kernels and references differ by op order and exp implementation only (a few
#   ulp amplified by up to 2 * iters normalisation steps and the backward's recompute).
# fp64: the same, for gradcheck-grade inputs.
# bf16 / fp16: one rounding of values that are equal in fp32 (one ulp: 2^-8, 2^-11),
#   plus headroom.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}


def assert_close_dtype(actual, expected, dtype=None, msg=None):
    """assert_close with the table's tolerance for ``dtype`` (default: expected's dtype).

    Also checks dtype, device and shape equality (assert_close does).
    """
    dtype = expected.dtype if dtype is None else dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=msg)


# For tests that need a GPU by construction (CUDA vs CPU comparisons).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
