"""hcext::sinkhorn and hcext::sinkhorn_backward: the wrapper, the fake kernels and the
autograd formula. The spec in code is ``hcext.reference.sinkhorn``."""

import math

import torch
from torch import Tensor

from ._checks import (
    MAX_N,
    check_device_like,
    check_iters,
    compute_dtype,
    contiguous_like,
    fake_kernel,
    first_order_only,
)

__all__ = ["sinkhorn"]


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
    n = logits.shape[-1]
    torch._check(1 <= n <= MAX_N, lambda: f"{op}: expected n (logits' last dim) in [1, {MAX_N}], got {n}")
    check_iters(iters, "iters", op)
    # Worded "to be finite" like the C++ check (the coefficient ops say "finite").
    torch._check(math.isfinite(eps) and eps >= 0.0, lambda: f"{op}: expected eps to be finite and >= 0, got {eps}")


@fake_kernel("hcext::sinkhorn")
def _sinkhorn_fake(logits, iters=20, eps=1e-6):
    _check_sinkhorn_args(logits, iters, eps, "hcext::sinkhorn")
    return logits.new_empty(logits.shape, dtype=compute_dtype(logits.dtype))


@fake_kernel("hcext::sinkhorn_backward")
def _sinkhorn_backward_fake(grad, logits, iters, eps):
    op = "hcext::sinkhorn_backward"
    _check_sinkhorn_args(logits, iters, eps, op)
    torch._check(
        grad.shape == logits.shape,
        lambda: f"{op}: expected grad of shape {tuple(logits.shape)}, got {tuple(grad.shape)}",
    )
    torch._check(
        grad.dtype.is_floating_point, lambda: f"{op}: expected grad to be a floating-point tensor, got {grad.dtype}"
    )
    check_device_like(grad, "grad", logits, "logits", op)
    # The gradient has the logits' shape and dtype (not the fp32 compute dtype).
    return contiguous_like(logits)


def _sinkhorn_setup_context(ctx, inputs, output):
    logits, iters, eps = inputs
    # The logits are all the backward needs: it recomputes the 2 * iters iterates.
    ctx.save_for_backward(logits)
    ctx.iters, ctx.eps = iters, eps


@first_order_only("hcext::sinkhorn")
def _sinkhorn_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.hcext.sinkhorn_backward.default(grad, logits, ctx.iters, ctx.eps), None, None


torch.library.register_autograd("hcext::sinkhorn", _sinkhorn_backward, setup_context=_sinkhorn_setup_context)
