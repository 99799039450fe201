"""Thin Python wrappers of ``torch.ops.hcext.*``, with their fake kernels (for
torch.compile / export) and autograd formulas. The kernels themselves are C++/CUDA
(csrc/); the readable definition of each op is in hcext/reference.py.
"""

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["sinkhorn", "mhc_coeffs"]


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
    torch._check(
        grad.dtype.is_floating_point,
        lambda: f"hcext::sinkhorn_backward: expected grad to be a floating-point tensor, got {grad.dtype}",
    )
    torch._check(
        grad.device == logits.device,
        lambda: f"hcext::sinkhorn_backward: expected grad on {logits.device} like logits, got {grad.device}",
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


# ---------------------------------------------------------------------------------------
# mHC coefficients


def mhc_coeffs(
    x: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    sinkhorn_iters: int = 20,
    norm_eps: float = 1e-6,
    sinkhorn_eps: float = 1e-6,
    pre_eps: float = 1e-6,
    post_mult: float = 2.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """mHC's per-token coefficients ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``
    from streams ``x [..., n, C]`` (mHC Eq. 7-9; see ``hcext.reference.mhc_coeffs``).

    ``phi [n*C, n*n+2n]``, ``alpha [3]``, ``bias [n*n+2n]`` are fp32 (fp64 with fp64 x);
    columns are split ``[pre n | post n | res n*n]``, res row-major ``H_res[dst, src]``.
    ``post_mult=2.0`` is the paper's 2σ (DeepSeek's TileKernels defaults to 1.0 and 10
    Sinkhorn iterations). x may be fp32/bf16/fp16; all coefficient math is fp32.
    Autograd saves x, the parameters, ``proj = x̃ @ phi`` (n*n+2n fp32 per token) and
    ``rstd`` (one per token); the Sinkhorn iterates are recomputed in backward.
    """
    return torch.ops.hcext.mhc_coeffs.default(
        x, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult
    )


def _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op):
    # Mirrors csrc/mhc_args.h (messages included) for fake tensors.
    torch._check(x.dim() >= 2, lambda: f"{op}: expected x of shape [..., n, C] with at least 2 dims, got shape {tuple(x.shape)}")
    torch._check(
        x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"{op}: expected x of dtype float32, bfloat16, float16 or float64, got {x.dtype}",
    )
    n, C = x.shape[-2], x.shape[-1]
    torch._check(1 <= n <= 32, lambda: f"{op}: expected n = x.size(-2) in [1, 32], got {n}")
    torch._check(C >= 1, lambda: f"{op}: expected C = x.size(-1) >= 1, got {C}")
    D = n * n + 2 * n
    compute = _compute_dtype(x.dtype)
    torch._check(
        phi.dim() == 2 and phi.shape[0] == n * C and phi.shape[1] == D,
        lambda: f"{op}: expected phi of shape [n*C, n*n+2n] = [{n * C}, {D}], got {tuple(phi.shape)}",
    )
    torch._check(alpha.shape == (3,), lambda: f"{op}: expected alpha of shape [3], got {tuple(alpha.shape)}")
    torch._check(bias.shape == (D,), lambda: f"{op}: expected bias of shape [n*n+2n] = [{D}], got {tuple(bias.shape)}")
    for name, t in (("phi", phi), ("alpha", alpha), ("bias", bias)):
        torch._check(t.dtype == compute, lambda: f"{op}: expected {name} of dtype {compute}, got {t.dtype}")
        torch._check(t.device == x.device, lambda: f"{op}: expected {name} on {x.device} (x's device), got {t.device}")
    torch._check(
        1 <= sinkhorn_iters <= (1 << 20), lambda: f"{op}: expected sinkhorn_iters in [1, 1048576], got {sinkhorn_iters}"
    )
    torch._check(
        math.isfinite(sinkhorn_eps) and sinkhorn_eps >= 0,
        lambda: f"{op}: expected sinkhorn_eps finite and >= 0, got {sinkhorn_eps}",
    )
    return n, C, D, compute


@torch.library.register_fake("hcext::mhc_coeffs_fwd")
def _mhc_coeffs_fwd_fake(x, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0):
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, "hcext::mhc_coeffs")
    lead = x.shape[:-2]
    new = lambda *shape: x.new_empty((*lead, *shape), dtype=compute)  # noqa: E731
    return new(n), new(n), new(n, n), new(D), new()


@torch.library.register_fake("hcext::mhc_backward")
def _mhc_backward_fake(
    x, phi, alpha, bias, proj, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_h_res,
    sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult,
):
    _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, "hcext::mhc_backward")
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(phi, memory_format=torch.contiguous_format),
        torch.empty_like(alpha, memory_format=torch.contiguous_format),
        torch.empty_like(bias, memory_format=torch.contiguous_format),
    )


def _mhc_coeffs_setup_context(ctx, inputs, output):
    x, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult = inputs
    proj, rstd = output[3], output[4]
    # Saved: the inputs (alive anyway), proj (n*n+2n fp32 per token) and rstd (1 per token).
    ctx.save_for_backward(x, phi, alpha, bias, proj, rstd)
    ctx.mark_non_differentiable(proj, rstd)
    ctx.args = (sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult)


def _mhc_coeffs_backward(ctx, g_pre, g_post, g_res, _g_proj, _g_rstd):
    x, phi, alpha, bias, proj, rstd = ctx.saved_tensors
    gx, gphi, galpha, gbias = torch.ops.hcext.mhc_backward.default(
        x, phi, alpha, bias, proj, rstd, None, g_pre, g_post, g_res, *ctx.args
    )
    return gx, gphi, galpha, gbias, None, None, None, None, None


torch.library.register_autograd(
    "hcext::mhc_coeffs_fwd", _mhc_coeffs_backward, setup_context=_mhc_coeffs_setup_context
)
