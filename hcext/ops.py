"""Thin Python wrappers of ``torch.ops.hcext.*``, with their fake kernels (for
torch.compile / export) and autograd formulas. The kernels themselves are C++/CUDA
(csrc/); the readable definition of each op is in hcext/reference.py.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "sinkhorn", "stream_aggregate", "stream_mix_expand", "mhc_coeffs", "mhc_pre", "mhc_post_pre", "hc_coeffs",
]


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
# stream_aggregate / stream_mix_expand
#
# Streams x are [..., n, C] (1 <= n <= 32). Coefficients are per token (h_pre / h_post
# [..., n], h_res [..., n, n], with x's leading dims) or shared by every token ([n],
# [n, n]: static Hyper-Connections). Coefficients are float32, or float64 when x is
# float64. The backward ops take output_mask (which gradients to compute). A gradient
# that is not requested comes back as an empty [0] tensor.


def stream_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """The layer input ``y = H_pre x``: ``y[..., c] = sum_i h_pre[..., i] * x[..., i, c]``.

    ``x [..., n, C]`` is float32, float64, bfloat16 or float16 with 1 <= n <= 32.
    ``h_pre`` is either per token, ``[..., n]``, or shared by every token, ``[n]``. It is
    float32, or float64 when x is float64. The sum is accumulated in fp32 (fp64 for fp64
    x). The result has x's dtype and shape ``[..., C]``. x may have any strides.
    Differentiable in x and h_pre. The gradient of a shared h_pre is summed over the
    tokens in a fixed order, so it is deterministic. See
    ``hcext.reference.stream_aggregate``.
    """
    return torch.ops.hcext.stream_aggregate.default(x, h_pre)


def stream_mix_expand(f: Tensor, x: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """The residual merge ``x' = H_res x + H_post^T f``, in one pass over the streams.

    ``out[..., i, c] = sum_j h_res[..., i, j] * x[..., j, c] + h_post[..., i] * f[..., c]``.
    ``x [..., n, C]`` holds the streams, and ``f [..., C]`` is the sub-layer's output. f
    has x's leading dims, C and dtype. ``h_post`` is ``[..., n]`` per token or ``[n]``
    shared. ``h_res`` is ``[..., n, n]`` per token or ``[n, n]`` shared, indexed
    ``[dst, src]``. Coefficients are float32, or float64 when x is float64. The math is
    fp32 and the result has x's dtype and shape. Any strides. Differentiable in every
    input. Shared coefficients' gradients are summed over tokens deterministically. See
    ``hcext.reference.stream_mix_expand``.
    """
    return torch.ops.hcext.stream_mix_expand.default(f, x, h_post, h_res)


def _streams_coef_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _check_streams_x(x: Tensor, op: str) -> int:
    # Mirrors csrc/streams_args.h so that traced code fails with the same messages.
    torch._check(
        x.dim() >= 2,
        lambda: f"{op}: expected x of shape [..., n, C] with at least 2 dims, got {x.dim()} dim(s)",
    )
    torch._check(
        x.dtype.is_floating_point,
        lambda: f"{op}: expected x to be a floating-point tensor (float32, float64, bfloat16 or float16), "
        f"got {x.dtype}",
    )
    n = x.shape[-2]
    torch._check(1 <= n <= 32, lambda: f"{op}: expected n (x's dim -2) in [1, 32], got {n}")
    return n


def _check_streams_coef(h: Tensor, name: str, rank: int, x: Tensor, op: str) -> None:
    torch._check(h.device == x.device, lambda: f"{op}: expected {name} on {x.device} like x, got {h.device}")
    want = _streams_coef_dtype(x.dtype)
    torch._check(h.dtype == want, lambda: f"{op}: expected {name} to be {want}, got {h.dtype}")
    n = x.shape[-2]
    shared_shape = (n,) * rank
    token_shape = tuple(x.shape[:-2]) + shared_shape
    shape = tuple(h.shape)
    torch._check(
        shape == token_shape or shape == shared_shape,
        lambda: f"{op}: expected {name} of shape {list(token_shape)} (per token) or {list(shared_shape)} "
        f"(shared by every token), got {list(shape)}",
    )


def _check_streams_f(f: Tensor, x: Tensor, op: str) -> None:
    torch._check(f.device == x.device, lambda: f"{op}: expected f on {x.device} like x, got {f.device}")
    torch._check(f.dtype == x.dtype, lambda: f"{op}: expected f to have x's dtype {x.dtype}, got {f.dtype}")
    torch._check(
        f.dim() >= 1 and f.shape[-1] == x.shape[-1],
        lambda: f"{op}: expected f's last dim (C) to be {x.shape[-1]} like x's, got f of shape {list(f.shape)}",
    )
    torch._check(
        tuple(f.shape[:-1]) == tuple(x.shape[:-2]),
        lambda: f"{op}: expected f's leading dims to be {list(x.shape[:-2])} (x's leading dims), "
        f"got f of shape {list(f.shape)}",
    )


def _check_streams_grad(grad: Tensor, out_shape, x: Tensor, op: str) -> None:
    torch._check(grad.device == x.device, lambda: f"{op}: expected grad on {x.device} like x, got {grad.device}")
    torch._check(
        grad.dtype == x.dtype, lambda: f"{op}: expected grad to have x's dtype {x.dtype}, got {grad.dtype}"
    )
    torch._check(
        tuple(grad.shape) == tuple(out_shape),
        lambda: f"{op}: expected grad of shape {list(out_shape)} (the output's), got {list(grad.shape)}",
    )


def _grad_or_skipped(wanted: bool, like: Tensor) -> Tensor:
    # Real kernels: a contiguous tensor of the input's shape, or an empty [0] when skipped.
    return like.new_empty(like.shape if wanted else (0,))


@torch.library.register_fake("hcext::stream_aggregate")
def _stream_aggregate_fake(x, h_pre):
    op = "hcext::stream_aggregate"
    _check_streams_x(x, op)
    _check_streams_coef(h_pre, "h_pre", 1, x, op)
    return x.new_empty((*x.shape[:-2], x.shape[-1]))


@torch.library.register_fake("hcext::stream_aggregate_backward")
def _stream_aggregate_backward_fake(grad, x, h_pre, output_mask=(True, True)):
    op = "hcext::stream_aggregate_backward"
    _check_streams_x(x, op)
    _check_streams_coef(h_pre, "h_pre", 1, x, op)
    _check_streams_grad(grad, (*x.shape[:-2], x.shape[-1]), x, op)
    return _grad_or_skipped(output_mask[0], x), _grad_or_skipped(output_mask[1], h_pre)


@torch.library.register_fake("hcext::stream_mix_expand")
def _stream_mix_expand_fake(f, x, h_post, h_res):
    op = "hcext::stream_mix_expand"
    _check_streams_x(x, op)
    _check_streams_f(f, x, op)
    _check_streams_coef(h_post, "h_post", 1, x, op)
    _check_streams_coef(h_res, "h_res", 2, x, op)
    return x.new_empty(x.shape)


@torch.library.register_fake("hcext::stream_mix_expand_backward")
def _stream_mix_expand_backward_fake(grad, f, x, h_post, h_res, output_mask=(True, True, True, True)):
    op = "hcext::stream_mix_expand_backward"
    _check_streams_x(x, op)
    _check_streams_f(f, x, op)
    _check_streams_coef(h_post, "h_post", 1, x, op)
    _check_streams_coef(h_res, "h_res", 2, x, op)
    _check_streams_grad(grad, x.shape, x, op)
    return tuple(_grad_or_skipped(m, t) for m, t in zip(output_mask, (f, x, h_post, h_res)))


def _stream_aggregate_setup_context(ctx, inputs, output):
    # Inputs only: the backward needs x and h_pre, never the output.
    ctx.save_for_backward(*inputs)


def _stream_aggregate_backward(ctx, grad):
    x, h_pre = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:2]]
    grad_x, grad_h_pre = torch.ops.hcext.stream_aggregate_backward.default(grad, x, h_pre, mask)
    return (grad_x if mask[0] else None), (grad_h_pre if mask[1] else None)


def _stream_mix_expand_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _stream_mix_expand_backward(ctx, grad):
    f, x, h_post, h_res = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:4]]
    grads = torch.ops.hcext.stream_mix_expand_backward.default(grad, f, x, h_post, h_res, mask)
    return tuple(g if m else None for g, m in zip(grads, mask))


torch.library.register_autograd(
    "hcext::stream_aggregate", _stream_aggregate_backward, setup_context=_stream_aggregate_setup_context
)
torch.library.register_autograd(
    "hcext::stream_mix_expand", _stream_mix_expand_backward, setup_context=_stream_mix_expand_setup_context
)


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


def mhc_pre(
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
    """What an mHC sub-layer needs before its branch: ``(layer_input [..., C] in x's dtype,
    h_post [..., n], h_res [..., n, n])``, i.e. :func:`mhc_coeffs` and
    ``layer_input = sum_i h_pre[i] * x_i`` in one op (see ``hcext.reference.mhc_pre``).
    Finish the sub-layer with ``stream_mix_expand(F(layer_input), x, h_post, h_res)``.

    The backward accumulates x's gradient from the projection, the norm and the
    aggregate in fp32 and rounds it to x's dtype once. Autograd saves the same as
    :func:`mhc_coeffs` (h_pre is recomputed from proj).
    """
    return torch.ops.hcext.mhc_pre.default(x, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult)


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


def _check_mhc_scalars(pre_eps, post_mult, op, norm_eps=None):
    # Mirrors check_mhc_norm_eps / check_mhc_scalars in csrc/mhc_args.h.
    if norm_eps is not None:
        torch._check(
            math.isfinite(norm_eps) and norm_eps >= 0, lambda: f"{op}: expected norm_eps finite and >= 0, got {norm_eps}"
        )
    torch._check(math.isfinite(pre_eps), lambda: f"{op}: expected pre_eps finite, got {pre_eps}")
    torch._check(math.isfinite(post_mult), lambda: f"{op}: expected post_mult finite, got {post_mult}")


def _check_mhc_backward_tensors(x, n, D, proj, rstd, grads, op):
    # Mirrors check_mhc_saved / check_mhc_grad in csrc/mhc_args.h.
    tokens = x.numel() // (n * x.shape[-1])
    torch._check(
        proj.numel() == tokens * D and proj.shape[-1] == D,
        lambda: f"{op}: expected proj of shape [..., {D}] with x's leading dims, got {tuple(proj.shape)}",
    )
    torch._check(
        rstd.numel() == tokens, lambda: f"{op}: expected rstd with one value per token ({tokens}), got {tuple(rstd.shape)}"
    )
    for name, g, per_token in grads:
        if g is not None:
            torch._check(
                g.numel() == tokens * per_token,
                lambda: f"{op}: expected {name} with {tokens * per_token} elements, got shape {tuple(g.shape)}",
            )


@torch.library.register_fake("hcext::mhc_coeffs_fwd")
def _mhc_coeffs_fwd_fake(x, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0):
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, "hcext::mhc_coeffs")
    _check_mhc_scalars(pre_eps, post_mult, "hcext::mhc_coeffs", norm_eps)
    lead = x.shape[:-2]
    new = lambda *shape: x.new_empty((*lead, *shape), dtype=compute)  # noqa: E731
    return new(n), new(n), new(n, n), new(D), new()


@torch.library.register_fake("hcext::mhc_pre_fwd")
def _mhc_pre_fwd_fake(x, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0):
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, "hcext::mhc_coeffs")
    _check_mhc_scalars(pre_eps, post_mult, "hcext::mhc_coeffs", norm_eps)
    lead = x.shape[:-2]
    new = lambda *shape: x.new_empty((*lead, *shape), dtype=compute)  # noqa: E731
    return x.new_empty((*lead, C)), new(n), new(n, n), new(D), new()


@torch.library.register_fake("hcext::mhc_backward")
def _mhc_backward_fake(
    x, phi, alpha, bias, proj, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_h_res,
    sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult,
):
    op = "hcext::mhc_backward"
    n, C, D, _ = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op)
    grads = (("grad_layer_input", grad_layer_input, C), ("grad_h_pre", grad_h_pre, n), ("grad_h_post", grad_h_post, n),
             ("grad_h_res", grad_h_res, n * n))
    _check_mhc_backward_tensors(x, n, D, proj, rstd, grads, op)
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


def _mhc_pre_backward(ctx, g_layer_input, g_post, g_res, _g_proj, _g_rstd):
    x, phi, alpha, bias, proj, rstd = ctx.saved_tensors
    gx, gphi, galpha, gbias = torch.ops.hcext.mhc_backward.default(
        x, phi, alpha, bias, proj, rstd, g_layer_input, None, g_post, g_res, *ctx.args
    )
    return gx, gphi, galpha, gbias, None, None, None, None, None


# Same saved tensors as mhc_coeffs_fwd: outputs 3 and 4 are proj and rstd in both.
torch.library.register_autograd("hcext::mhc_pre_fwd", _mhc_pre_backward, setup_context=_mhc_coeffs_setup_context)


# ---------------------------------------------------------------------------------------
# The fused layer boundary: stream_mix_expand of layer l, then mhc_pre of layer l + 1


def mhc_post_pre(
    f: Tensor,
    x: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    sinkhorn_iters: int = 20,
    norm_eps: float = 1e-6,
    sinkhorn_eps: float = 1e-6,
    pre_eps: float = 1e-6,
    post_mult: float = 2.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The boundary between two mHC sub-layers in one op:
    ``x_next = stream_mix_expand(f, x, h_post, h_res)`` (layer l's residual merge, with its
    branch output f and coefficients h_post, h_res), then layer l+1's
    ``mhc_pre(x_next, phi, alpha, bias, ...)``. Returns ``(x_next, layer_input, h_post_next,
    h_res_next)``; equal to the unfused composition (``hcext.reference.mhc_post_pre``).

    The pass that writes ``x_next`` also reduces it (as stored, in x's dtype) to the next
    layer's RMS statistic, so the streams are written once and not read back for it. In
    backward, x_next's gradient from its other consumers and from the coefficients are
    summed in fp32 and rounded once. Autograd saves f, x, h_post, h_res, x_next (all alive
    anyway), the parameters, proj and rstd.
    """
    return torch.ops.hcext.mhc_post_pre.default(
        f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult
    )


def _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op):
    # Mirrors mhc_post_pre_fwd_impl in csrc/mhc_driver.h: the mHC checks, then the streams' checks.
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_streams_x(x, op)
    _check_streams_f(f, x, op)
    _check_streams_coef(h_post, "h_post", 1, x, op)
    _check_streams_coef(h_res, "h_res", 2, x, op)
    return n, C, D, compute


@torch.library.register_fake("hcext::mhc_post_pre_fwd")
def _mhc_post_pre_fwd_fake(
    f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6,
    post_mult=2.0,
):
    op = "hcext::mhc_post_pre"
    n, C, D, compute = _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op, norm_eps)
    lead = x.shape[:-2]
    new = lambda *shape: x.new_empty((*lead, *shape), dtype=compute)  # noqa: E731
    x_next = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x_next, x.new_empty((*lead, C)), new(n), new(n, n), new(D), new()


@torch.library.register_fake("hcext::mhc_post_pre_backward")
def _mhc_post_pre_backward_fake(
    grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next, f, x, h_post, h_res, x_next, phi, alpha, bias,
    proj, rstd, sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult, output_mask=(True, True, True, True),
):
    op = "hcext::mhc_post_pre_backward"
    n, C, D, _ = _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op)
    torch._check(
        x_next.shape == x.shape and x_next.dtype == x.dtype,
        lambda: f"{op}: expected x_next with x's shape {list(x.shape)} and dtype {x.dtype}, got "
        f"{list(x_next.shape)} {x_next.dtype}",
    )
    if grad_x_next is not None:
        _check_streams_grad(grad_x_next, x.shape, x, op)
    grads = (("grad_layer_input", grad_layer_input, C), ("grad_h_post", grad_h_post_next, n),
             ("grad_h_res", grad_h_res_next, n * n))
    _check_mhc_backward_tensors(x_next, n, D, proj, rstd, grads, op)
    contiguous = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return (
        _grad_or_skipped(output_mask[0], f),
        _grad_or_skipped(output_mask[1], x),
        _grad_or_skipped(output_mask[2], h_post),
        _grad_or_skipped(output_mask[3], h_res),
        contiguous(phi),
        contiguous(alpha),
        contiguous(bias),
    )


def _mhc_post_pre_setup_context(ctx, inputs, output):
    f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult = inputs
    x_next, proj, rstd = output[0], output[4], output[5]
    # Saved: the inputs and x_next (alive anyway: x_next is the next sub-layer's input),
    # proj (n*n+2n fp32 per token) and rstd (1 per token).
    ctx.save_for_backward(f, x, h_post, h_res, x_next, phi, alpha, bias, proj, rstd)
    ctx.mark_non_differentiable(proj, rstd)
    ctx.args = (sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult)


def _mhc_post_pre_backward(ctx, g_x_next, g_layer_input, g_post, g_res, _g_proj, _g_rstd):
    f, x, h_post, h_res, x_next, phi, alpha, bias, proj, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    gf, gx, ghp, ghr, gphi, galpha, gbias = torch.ops.hcext.mhc_post_pre_backward.default(
        g_x_next, g_layer_input, g_post, g_res, f, x, h_post, h_res, x_next, phi, alpha, bias, proj, rstd,
        *ctx.args, mask,
    )
    keep = lambda g, wanted: g if wanted else None  # noqa: E731
    return (
        keep(gf, mask[0]), keep(gx, mask[1]), keep(ghp, mask[2]), keep(ghr, mask[3]), gphi, galpha, gbias,
        None, None, None, None, None,
    )


torch.library.register_autograd(
    "hcext::mhc_post_pre_fwd", _mhc_post_pre_backward, setup_context=_mhc_post_pre_setup_context
)


# ---------------------------------------------------------------------------------------
# Original Hyper-Connections coefficients (HC, arXiv 2409.19606v3)

_HC_NORMS = ("rms", "layer")
# Gradient order of hc_coeffs_backward's outputs (and its output_mask).
_HC_GRAD_INPUTS = (
    "x", "static_alpha", "static_beta", "dynamic_alpha", "dynamic_beta", "alpha_scale", "beta_scale", "norm_weight",
    "norm_bias",
)


def hc_coeffs(
    x: Tensor,
    static_alpha: Tensor,
    static_beta: Tensor,
    dynamic_alpha: Optional[Tensor] = None,
    dynamic_beta: Optional[Tensor] = None,
    alpha_scale: Optional[Tensor] = None,
    beta_scale: Optional[Tensor] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm: str = "rms",
    norm_eps: float = 1e-6,
    use_tanh: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Hyper-Connections coefficients ``(h_pre, h_post, h_res)`` in hcext's stream-op
    convention (HC Eq. 1-7, Alg. 2; see ``hcext.reference.hc_coeffs``), ready for
    :func:`stream_aggregate` and :func:`stream_mix_expand`.

    ``x [..., n, C]`` (fp32/bf16/fp16, or fp64), 1 <= n <= 32. Parameters (fp32; fp64 with
    fp64 x): ``static_alpha [n, n+1] = [A_m | A_r]`` (row i = source stream i), ``static_beta
    [n] = B``, ``dynamic_alpha [C, n+1]``, ``dynamic_beta [C]``, ``alpha_scale`` /
    ``beta_scale`` 0-dim (a missing one is 1), ``norm_weight`` / ``norm_bias [C]`` of the
    per-stream norm (``norm="rms"`` or ``"layer"``). ``use_tanh=False`` drops the tanh.

    Static HC (no dynamic weights): the shared ``[n], [n], [n, n]`` coefficients, copied from
    the parameters, with no per-token work. Dynamic HC (either or both dynamic weights):
    per-token ``[..., n], [..., n], [..., n, n]`` computed in one pass over x (the norm's
    statistics and the projections together; the normalised streams are never stored).
    fp32 math, fp32 outputs (fp64 for fp64 x). Autograd saves x, the parameters, ``proj``
    (``n*K`` values per token, K = n+2 with both dynamic weights) and ``stats`` (mean and
    rstd per stream); parameter gradients are summed over tokens deterministically.
    """
    return torch.ops.hcext.hc_coeffs.default(
        x, static_alpha, static_beta, dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias,
        norm, norm_eps, use_tanh,
    )


def _check_hc_args(x, static_alpha, static_beta, optional, norm, op):
    """Mirrors check_hc_args in csrc/hc_args.h (messages included) for fake tensors.
    ``optional``: the six optional parameters in schema order. Returns (n, C, K, compute)."""
    torch._check(
        x.dim() >= 2, lambda: f"{op}: expected x of shape [..., n, C] with at least 2 dims, got shape {tuple(x.shape)}"
    )
    torch._check(
        x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"{op}: expected x of dtype float32, bfloat16, float16 or float64, got {x.dtype}",
    )
    n, C = x.shape[-2], x.shape[-1]
    torch._check(1 <= n <= 32, lambda: f"{op}: expected n = x.size(-2) in [1, 32], got {n}")
    torch._check(C >= 1, lambda: f"{op}: expected C = x.size(-1) >= 1, got {C}")
    torch._check(norm in _HC_NORMS, lambda: f'{op}: expected norm to be "rms" or "layer", got "{norm}"')
    compute = _compute_dtype(x.dtype)
    dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias = optional
    params = (
        ("static_alpha", static_alpha, (n, n + 1), "[n, n+1]"),
        ("static_beta", static_beta, (n,), "[n]"),
        ("dynamic_alpha", dynamic_alpha, (C, n + 1), "[C, n+1]"),
        ("dynamic_beta", dynamic_beta, (C,), "[C]"),
        ("alpha_scale", alpha_scale, (), "[] (0-dim)"),
        ("beta_scale", beta_scale, (), "[] (0-dim)"),
        ("norm_weight", norm_weight, (C,), "[C]"),
        ("norm_bias", norm_bias, (C,), "[C]"),
    )
    for name, t, shape, text in params:
        if t is None:
            continue
        torch._check(
            tuple(t.shape) == shape,
            lambda: f"{op}: expected {name} of shape {text} = {list(shape)}, got {list(t.shape)}",
        )
        torch._check(t.dtype == compute, lambda: f"{op}: expected {name} of dtype {compute}, got {t.dtype}")
        torch._check(t.device == x.device, lambda: f"{op}: expected {name} on {x.device} (x's device), got {t.device}")
    K = (n + 1 if dynamic_alpha is not None else 0) + (1 if dynamic_beta is not None else 0)
    return n, C, K, compute


@torch.library.register_fake("hcext::hc_coeffs_fwd")
def _hc_coeffs_fwd_fake(
    x, static_alpha, static_beta, dynamic_alpha=None, dynamic_beta=None, alpha_scale=None, beta_scale=None,
    norm_weight=None, norm_bias=None, norm="rms", norm_eps=1e-6, use_tanh=True,
):
    op = "hcext::hc_coeffs"
    optional = (dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias)
    n, C, K, compute = _check_hc_args(x, static_alpha, static_beta, optional, norm, op)
    torch._check(
        math.isfinite(norm_eps) and norm_eps >= 0, lambda: f"{op}: expected norm_eps finite and >= 0, got {norm_eps}"
    )
    if K == 0:  # static HC: shared coefficients, nothing saved
        new = lambda *shape: x.new_empty(shape, dtype=compute)  # noqa: E731
        return new(n), new(n), new(n, n), new(0), new(0)
    lead = x.shape[:-2]
    new = lambda *shape: x.new_empty((*lead, *shape), dtype=compute)  # noqa: E731
    return new(n), new(n), new(n, n), new(n, K), new(n, 2)


@torch.library.register_fake("hcext::hc_coeffs_backward")
def _hc_coeffs_backward_fake(
    x, static_alpha, static_beta, dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias,
    proj, stats, grad_h_pre, grad_h_post, grad_h_res, norm, use_tanh, output_mask=(True,) * 9,
):
    # Mirrors hc_coeffs_backward_impl's checks in csrc/hc_driver.h and csrc/hc_args.h.
    op = "hcext::hc_coeffs_backward"
    optional = (dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias)
    n, C, K, compute = _check_hc_args(x, static_alpha, static_beta, optional, norm, op)
    torch._check(
        K > 0,
        lambda: f"{op}: expected dynamic_alpha or dynamic_beta (static HC's gradient is the incoming gradient itself)",
    )
    tokens = x.numel() // (n * C)
    torch._check(
        proj.numel() == tokens * n * K and proj.dim() >= 2 and proj.shape[-1] == K and proj.shape[-2] == n,
        lambda: f"{op}: expected proj of shape [..., n, K] = [..., {n}, {K}] with x's leading dims, "
        f"got {list(proj.shape)}",
    )
    torch._check(
        stats.numel() == tokens * n * 2 and stats.dim() >= 2 and stats.shape[-1] == 2 and stats.shape[-2] == n,
        lambda: f"{op}: expected stats of shape [..., n, 2] = [..., {n}, 2] with x's leading dims, "
        f"got {list(stats.shape)}",
    )
    for name, t in (("proj", proj), ("stats", stats)):
        torch._check(t.dtype == compute, lambda: f"{op}: expected {name} of dtype {compute}, got {t.dtype}")
        torch._check(t.device == x.device, lambda: f"{op}: expected {name} on {x.device} (x's device), got {t.device}")
    for name, g, per_token in (("grad_h_pre", grad_h_pre, n), ("grad_h_post", grad_h_post, n),
                               ("grad_h_res", grad_h_res, n * n)):
        if g is None:
            continue
        torch._check(
            g.numel() == tokens * per_token,
            lambda: f"{op}: expected {name} with {tokens * per_token} elements, got shape {list(g.shape)}",
        )
        torch._check(g.dtype.is_floating_point, lambda: f"{op}: expected {name} to be floating point, got {g.dtype}")
        torch._check(g.device == x.device, lambda: f"{op}: expected {name} on {x.device} (x's device), got {g.device}")
    inputs = (x, static_alpha, static_beta, *optional)
    grads = []
    for wanted, t in zip(output_mask, inputs):
        if not wanted or t is None:
            grads.append(x.new_empty((0,), dtype=compute))
        elif t is x:
            grads.append(torch.empty_like(x, memory_format=torch.contiguous_format))
        else:
            grads.append(t.new_empty(t.shape))
    return tuple(grads)


def _hc_coeffs_setup_context(ctx, inputs, output):
    x, static_alpha, static_beta = inputs[:3]
    optional = inputs[3:9]  # dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias
    norm, _norm_eps, use_tanh = inputs[9:]
    ctx.static = optional[0] is None and optional[1] is None
    ctx.args = (norm, use_tanh)
    ctx.present = [t is not None for t in optional]
    ctx.mark_non_differentiable(output[3], output[4])
    if ctx.static:
        return  # the gradient is the incoming one, rearranged: nothing to save
    # Saved: the inputs (alive anyway), proj (n*K per token) and stats (2n per token).
    given = [t for t in optional if t is not None]
    ctx.save_for_backward(x, static_alpha, static_beta, *given, output[3], output[4])


def _hc_coeffs_backward(ctx, g_pre, g_post, g_res, _g_proj, _g_stats):
    if ctx.static:
        # h_pre = static_alpha[:, 0], h_res = static_alpha[:, 1:]^T, h_post = static_beta: the
        # incoming gradients rearranged, with plain torch ops on [n]-sized tensors.
        grad_alpha = grad_beta = None
        if ctx.needs_input_grad[1] and (g_pre is not None or g_res is not None):
            like = g_pre if g_pre is not None else g_res
            n = like.shape[0]
            pre = g_pre if g_pre is not None else like.new_zeros(n)
            res_t = g_res.t() if g_res is not None else like.new_zeros(n, n)
            grad_alpha = torch.cat([pre.unsqueeze(1), res_t], dim=1)
        if ctx.needs_input_grad[2]:
            grad_beta = g_post
        return (None, grad_alpha, grad_beta) + (None,) * 9
    saved = list(ctx.saved_tensors)
    x, static_alpha, static_beta = saved[:3]
    optional = [saved.pop(3) if present else None for present in ctx.present]
    proj, stats = saved[3:]
    # needs_input_grad covers the arguments actually passed (the dispatcher drops trailing
    # arguments equal to their defaults): the rest need no gradient.
    mask = [bool(m) for m in (*ctx.needs_input_grad, *([False] * 9))[:9]]
    grads = torch.ops.hcext.hc_coeffs_backward.default(
        x, static_alpha, static_beta, *optional, proj, stats, g_pre, g_post, g_res, *ctx.args, mask
    )
    inputs_present = [True, True, True, *ctx.present]
    out = tuple(g if (m and p) else None for g, m, p in zip(grads, mask, inputs_present))
    return out + (None, None, None)


torch.library.register_autograd(
    "hcext::hc_coeffs_fwd", _hc_coeffs_backward, setup_context=_hc_coeffs_setup_context
)
