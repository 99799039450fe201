"""Not mirrored: importing it raises ``ImportError`` (a Triton kernel; hcext has its own
Sinkhorn kernels for CPU and CUDA)."""

from ._unsupported_module import unsupported_module

raise unsupported_module(
    "triton_sinkhorn",
    "a Triton log-domain Sinkhorn-Knopp kernel, `triton_sinkhorn(log_alpha, iters)`",
    "`hcext.ops.sinkhorn(log_alpha, iters, eps=0.0)` (CPU and CUDA, differentiable, torch.compile-able): the same "
    "matrix, rows and columns normalised in the same order. `hcext.compat.mHCv2.mHC(..., use_triton_sinkhorn=True)` "
    "already runs it.",
)
