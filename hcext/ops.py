"""Thin Python wrappers of ``torch.ops.hcext.*``, with their fake kernels (for
torch.compile / export) and autograd formulas. The kernels themselves are C++/CUDA
(csrc/); the readable definition of each op is in hcext/reference.py.
"""

import math

import torch
from torch import Tensor

__all__ = ["sinkhorn"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Coefficient math is fp32; fp64 stays fp64; fp16/bf16 are computed in (and return) fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# sinkhorn


def sinkhorn(logits: Tensor, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Sinkhorn-Knopp projection of ``logits [..., n, n]`` onto (nearly) doubly stochastic
    matrices, in mHC's convention ``H[dst, src]`` (rows sum to 1 up to eps).

    Exactly DeepSeek's iteration (see ``hcext.reference.sinkhorn``)::

        P = softmax(logits, dim=-2) + eps
        P = P / (P.sum(-1, keepdim=True) + eps)
        repeat iters - 1 times: normalise columns, then rows (each + eps)

    Computed in fp32 (fp64 for fp64 input); fp16/bf16 logits return fp32. Any strides,
    any leading dims (including none or zero tokens), 1 <= n <= 32. Differentiable: the
    backward saves only the logits and recomputes the iterates.
    """
    return torch.ops.hcext.sinkhorn.default(logits, iters, eps)


def _check_sinkhorn_args(logits: Tensor, iters: int, eps: float, op: str) -> None:
    # Mirrors csrc/sinkhorn_args.h so that traced code fails with the same messages.
    torch._check(
        logits.dim() >= 2,
        lambda: f"{op}: expected logits of shape [..., n, n] with at least 2 dims, got {logits.dim()} dim(s)",
    )
    torch._check(
        logits.shape[-1] == logits.shape[-2],
        lambda: f"{op}: expected logits' last two dims to be square [..., n, n], got shape {tuple(logits.shape)}",
    )
    torch._check(
        logits.dtype.is_floating_point,
        lambda: f"{op}: expected logits to be a floating-point tensor (float32, float64, bfloat16 or float16), "
        f"got {logits.dtype}",
    )
    torch._check(
        1 <= logits.shape[-1] <= 32, lambda: f"{op}: expected n (logits' last dim) in [1, 32], got {logits.shape[-1]}"
    )
    torch._check(1 <= iters <= (1 << 20), lambda: f"{op}: expected iters in [1, 1048576], got {iters}")
    torch._check(
        math.isfinite(eps) and eps >= 0.0, lambda: f"{op}: expected eps to be finite and >= 0, got {eps}"
    )


@torch.library.register_fake("hcext::sinkhorn")
def _sinkhorn_fake(logits, iters=20, eps=1e-6):
    _check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn")
    return logits.new_empty(logits.shape, dtype=_compute_dtype(logits.dtype))


@torch.library.register_fake("hcext::sinkhorn_backward")
def _sinkhorn_backward_fake(grad, logits, iters, eps):
    _check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn_backward")
    torch._check(
        grad.shape == logits.shape,
        lambda: f"hcext::sinkhorn_backward: expected grad of shape {tuple(logits.shape)}, got {tuple(grad.shape)}",
    )
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sinkhorn_setup_context(ctx, inputs, output):
    logits, iters, eps = inputs
    # The logits are all the backward needs: it recomputes the 2 * iters iterates.
    ctx.save_for_backward(logits)
    ctx.iters, ctx.eps = iters, eps


def _sinkhorn_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.hcext.sinkhorn_backward.default(grad, logits, ctx.iters, ctx.eps), None, None


torch.library.register_autograd("hcext::sinkhorn", _sinkhorn_backward, setup_context=_sinkhorn_setup_context)
