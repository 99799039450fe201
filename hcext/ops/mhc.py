"""mHC's ops: hcext::mhc_coeffs, hcext::mhc_pre and the fused layer boundary
hcext::mhc_post_pre, and DeepSeek-V4.1's shifted collapse hcext::mhc_pre_shifted /
hcext::mhc_post_pre_shifted (with their _fwd and backward ops): the wrappers, the fake
kernels and the autograd formulas. The spec in code is ``hcext.reference.mhc_coeffs`` /
``mhc_pre`` / ``mhc_post_pre`` / ``mhc_pre_shifted`` / ``mhc_post_pre_shifted``.

The public ops are composites over the _fwd ops, which also return the saved
intermediates: ``proj = x̃ @ phi`` (n*n+2n values per token, in the compute dtype) and
``rstd`` (the RMS norm's reciprocal, one per token).
"""

from typing import Tuple

import torch
from torch import Tensor

from ._checks import (
    check_coeff_tensor,
    check_coeff_x,
    check_finite,
    check_finite_eps,
    check_iters,
    check_optional_grad,
    check_streams_coef,
    check_streams_f,
    check_streams_x,
    compute_dtype,
    contiguous_like,
    fake_kernel,
    grad_or_skipped,
    per_token,
    first_order_only,
)

__all__ = ["mhc_coeffs", "mhc_pre", "mhc_post_pre", "mhc_pre_shifted", "mhc_post_pre_shifted"]


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


def mhc_pre_shifted(
    x: Tensor,
    pre_mix: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    sinkhorn_iters: int = 20,
    norm_eps: float = 1e-6,
    sinkhorn_eps: float = 1e-6,
    pre_eps: float = 1e-6,
    post_mult: float = 2.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """DeepSeek-V4.1's shifted collapse: :func:`mhc_pre` with the layer input collapsed with
    the previous sub-layer's pre instead of x's own. Returns ``(layer_input [..., C],
    h_post [..., n], h_res [..., n, n], next_pre_mix [..., n])``::

        h_pre, h_post, h_res = mhc_coeffs(x, phi, alpha, bias, ...)   # from x, as mhc_pre
        layer_input = sum_i pre_mix[..., i] * x[..., i, :]             # the given pre_mix
        next_pre_mix = h_pre                                           # for the next sub-layer

    ``pre_mix`` is per token ``[..., n]`` or shared ``[n]``, fp32 (fp64 with fp64 x); the
    first sub-layer uses ``e_0`` (``torch.eye(n)[0]``). Gradients: x gets ``pre_mix[i] * g``
    from the layer input (summed with the coefficient path in fp32, rounded once), pre_mix
    gets ``sum_c g[c] * x[i, c]``, and next_pre_mix's gradient flows into the coefficients.
    See ``hcext.reference.mhc_pre_shifted``.
    """
    return torch.ops.hcext.mhc_pre_shifted.default(
        x, pre_mix, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult
    )


def mhc_post_pre_shifted(
    f: Tensor,
    x: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    pre_mix: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    sinkhorn_iters: int = 20,
    norm_eps: float = 1e-6,
    sinkhorn_eps: float = 1e-6,
    pre_eps: float = 1e-6,
    post_mult: float = 2.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused boundary with the shifted collapse: ``x_next = stream_mix_expand(f, x,
    h_post, h_res)``, then :func:`mhc_pre_shifted` of x_next with ``pre_mix`` (the pre of the
    sub-layer whose branch produced f). Returns ``(x_next, layer_input, h_post_next,
    h_res_next, next_pre_mix)``; see ``hcext.reference.mhc_post_pre_shifted``.
    """
    return torch.ops.hcext.mhc_post_pre_shifted.default(
        f, x, h_post, h_res, pre_mix, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult
    )


# ---------------------------------------------------------------------------------------
# checks (the mHC ones; the stream ones are shared with hcext/ops/streams.py)


def _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op):
    """x and the parameters phi, alpha, bias. Returns (n, C, D = n*n+2n, compute dtype)."""
    n, C = check_coeff_x(x, op)
    D = n * n + 2 * n
    compute = compute_dtype(x.dtype)
    torch._check(
        phi.dim() == 2 and phi.shape[0] == n * C and phi.shape[1] == D,
        lambda: f"{op}: expected phi of shape [n*C, n*n+2n] = [{n * C}, {D}], got {tuple(phi.shape)}",
    )
    torch._check(alpha.shape == (3,), lambda: f"{op}: expected alpha of shape [3], got {tuple(alpha.shape)}")
    torch._check(bias.shape == (D,), lambda: f"{op}: expected bias of shape [n*n+2n] = [{D}], got {tuple(bias.shape)}")
    for name, t in (("phi", phi), ("alpha", alpha), ("bias", bias)):
        check_coeff_tensor(t, name, x, compute, op)
    check_iters(sinkhorn_iters, "sinkhorn_iters", op)
    check_finite_eps(sinkhorn_eps, "sinkhorn_eps", op)
    return n, C, D, compute


def _check_mhc_scalars(pre_eps, post_mult, op, norm_eps=None):
    # norm_eps: forward ops only (the backward ops take the saved rstd instead).
    if norm_eps is not None:
        check_finite_eps(norm_eps, "norm_eps", op)
    check_finite(pre_eps, "pre_eps", op)
    check_finite(post_mult, "post_mult", op)


def _check_mhc_saved(x, n, D, compute, proj, rstd, grads, op):
    """The backward ops' saved proj [..., D] and rstd [...], and the incoming gradients
    ``grads``: (name, tensor or None, elements per token)."""
    tokens = x.numel() // (n * x.shape[-1])
    torch._check(
        proj.numel() == tokens * D and proj.shape[-1] == D,
        lambda: f"{op}: expected proj of shape [..., {D}] with x's leading dims, got {tuple(proj.shape)}",
    )
    torch._check(
        rstd.numel() == tokens, lambda: f"{op}: expected rstd with one value per token ({tokens}), got {tuple(rstd.shape)}"
    )
    check_coeff_tensor(proj, "proj", x, compute, op)
    check_coeff_tensor(rstd, "rstd", x, compute, op)
    for name, g, per_token_numel in grads:
        check_optional_grad(g, name, tokens * per_token_numel, x, op)


def _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op):
    # The mHC checks, then those of the merge (x, f, h_post, h_res as stream_mix_expand's).
    dims = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    check_streams_x(x, op)
    check_streams_f(f, x, op)
    check_streams_coef(h_post, "h_post", 1, x, op)
    check_streams_coef(h_res, "h_res", 2, x, op)
    return dims


def _check_boundary_backward(x, x_next, grad_x_next, op):
    """The boundary backward ops' saved x_next and incoming grad_x_next: x's shape and dtype."""
    torch._check(
        x_next.shape == x.shape and x_next.dtype == x.dtype and x_next.device == x.device,
        lambda: f"{op}: expected x_next with x's shape {list(x.shape)}, dtype {x.dtype} and device {x.device}, got "
        f"{list(x_next.shape)} {x_next.dtype} on {x_next.device}",
    )
    g = grad_x_next
    torch._check(
        g is None or (g.shape == x.shape and g.dtype == x.dtype and g.device == x.device),
        lambda: f"{op}: expected grad_x_next with x's shape {list(x.shape)}, dtype {x.dtype} and device {x.device}, "
        f"got {list(g.shape)} {g.dtype} on {g.device}",
    )


# ---------------------------------------------------------------------------------------
# mhc_coeffs / mhc_pre: fake kernels and autograd


@fake_kernel("hcext::mhc_coeffs_fwd")
def _mhc_coeffs_fwd_fake(x, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0):
    op = "hcext::mhc_coeffs"
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op, norm_eps)
    return (per_token(x, compute, n), per_token(x, compute, n), per_token(x, compute, n, n), per_token(x, compute, D),
            per_token(x, compute))


@fake_kernel("hcext::mhc_pre_fwd")
def _mhc_pre_fwd_fake(x, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0):
    op = "hcext::mhc_coeffs"  # the C++ op checks its arguments as mhc_coeffs does
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op, norm_eps)
    return (per_token(x, x.dtype, C), per_token(x, compute, n), per_token(x, compute, n, n), per_token(x, compute, D),
            per_token(x, compute))


@fake_kernel("hcext::mhc_backward")
def _mhc_backward_fake(
    x, phi, alpha, bias, proj, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_h_res,
    sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult,
):
    op = "hcext::mhc_backward"
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op)
    grads = (("grad_layer_input", grad_layer_input, C), ("grad_h_pre", grad_h_pre, n), ("grad_h_post", grad_h_post, n),
             ("grad_h_res", grad_h_res, n * n))
    _check_mhc_saved(x, n, D, compute, proj, rstd, grads, op)
    return contiguous_like(x), contiguous_like(phi), contiguous_like(alpha), contiguous_like(bias)


def _mhc_coeffs_setup_context(ctx, inputs, output):
    x, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult = inputs
    proj, rstd = output[3], output[4]
    # Saved: the inputs (alive anyway), proj (n*n+2n fp32 per token) and rstd (1 per token).
    ctx.save_for_backward(x, phi, alpha, bias, proj, rstd)
    ctx.mark_non_differentiable(proj, rstd)
    # An unused output's gradient stays None (the backward ops take None as zero) instead of
    # materialised zeros, which would be plain tensors next to DTensor inputs.
    ctx.set_materialize_grads(False)
    ctx.args = (sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult)


@first_order_only("hcext::mhc_coeffs")
def _mhc_coeffs_backward(ctx, g_pre, g_post, g_res, _g_proj, _g_rstd):
    x, phi, alpha, bias, proj, rstd = ctx.saved_tensors
    gx, gphi, galpha, gbias = torch.ops.hcext.mhc_backward.default(
        x, phi, alpha, bias, proj, rstd, None, g_pre, g_post, g_res, *ctx.args
    )
    return gx, gphi, galpha, gbias, None, None, None, None, None


@first_order_only("hcext::mhc_pre")
def _mhc_pre_backward(ctx, g_layer_input, g_post, g_res, _g_proj, _g_rstd):
    # h_pre is not an output of mhc_pre: its gradient comes through layer_input instead.
    x, phi, alpha, bias, proj, rstd = ctx.saved_tensors
    gx, gphi, galpha, gbias = torch.ops.hcext.mhc_backward.default(
        x, phi, alpha, bias, proj, rstd, g_layer_input, None, g_post, g_res, *ctx.args
    )
    return gx, gphi, galpha, gbias, None, None, None, None, None


torch.library.register_autograd(
    "hcext::mhc_coeffs_fwd", _mhc_coeffs_backward, setup_context=_mhc_coeffs_setup_context
)
# Same saved tensors as mhc_coeffs_fwd: outputs 3 and 4 are proj and rstd in both.
torch.library.register_autograd("hcext::mhc_pre_fwd", _mhc_pre_backward, setup_context=_mhc_coeffs_setup_context)


# ---------------------------------------------------------------------------------------
# mhc_post_pre, the fused layer boundary (stream_mix_expand of layer l, then mhc_pre of
# layer l + 1): fake kernels and autograd


@fake_kernel("hcext::mhc_post_pre_fwd")
def _mhc_post_pre_fwd_fake(
    f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6,
    post_mult=2.0,
):
    op = "hcext::mhc_post_pre"
    n, C, D, compute = _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op, norm_eps)
    x_next = contiguous_like(x)
    return (x_next, per_token(x, x.dtype, C), per_token(x, compute, n), per_token(x, compute, n, n),
            per_token(x, compute, D), per_token(x, compute))


@fake_kernel("hcext::mhc_post_pre_backward")
def _mhc_post_pre_backward_fake(
    grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next, f, x, h_post, h_res, x_next, phi, alpha, bias,
    proj, rstd, sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult, output_mask=(True, True, True, True),
):
    op = "hcext::mhc_post_pre_backward"
    n, C, D, compute = _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op)
    _check_boundary_backward(x, x_next, grad_x_next, op)
    grads = (("grad_layer_input", grad_layer_input, C), ("grad_h_post_next", grad_h_post_next, n),
             ("grad_h_res_next", grad_h_res_next, n * n))
    _check_mhc_saved(x_next, n, D, compute, proj, rstd, grads, op)
    return (
        *(grad_or_skipped(m, t) for m, t in zip(output_mask, (f, x, h_post, h_res))),
        contiguous_like(phi),
        contiguous_like(alpha),
        contiguous_like(bias),
    )


def _mhc_post_pre_setup_context(ctx, inputs, output):
    f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult = inputs
    x_next, proj, rstd = output[0], output[4], output[5]
    # Saved: the inputs and x_next (alive anyway: x_next is the next sub-layer's input),
    # proj (n*n+2n fp32 per token) and rstd (1 per token).
    ctx.save_for_backward(f, x, h_post, h_res, x_next, phi, alpha, bias, proj, rstd)
    ctx.mark_non_differentiable(proj, rstd)
    # An unused output's gradient stays None (the backward ops take None as zero) instead of
    # materialised zeros, which would be plain tensors next to DTensor inputs.
    ctx.set_materialize_grads(False)
    ctx.args = (sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult)


@first_order_only("hcext::mhc_post_pre")
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
# The shifted collapse (DeepSeek-V4.1): fake kernels and autograd


@fake_kernel("hcext::mhc_pre_shifted_fwd")
def _mhc_pre_shifted_fwd_fake(
    x, pre_mix, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0
):
    op = "hcext::mhc_pre_shifted"
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    _check_mhc_scalars(pre_eps, post_mult, op, norm_eps)
    check_streams_x(x, op)
    check_streams_coef(pre_mix, "pre_mix", 1, x, op)
    return (per_token(x, x.dtype, C), per_token(x, compute, n), per_token(x, compute, n, n), per_token(x, compute, n),
            per_token(x, compute, D), per_token(x, compute))


@fake_kernel("hcext::mhc_shifted_backward")
def _mhc_shifted_backward_fake(
    x, pre_mix, phi, alpha, bias, proj, rstd, grad_layer_input, grad_next_pre_mix, grad_h_post, grad_h_res,
    sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult,
):
    op = "hcext::mhc_shifted_backward"
    n, C, D, compute = _check_mhc_args(x, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    check_streams_x(x, op)
    check_streams_coef(pre_mix, "pre_mix", 1, x, op)
    _check_mhc_scalars(pre_eps, post_mult, op)
    grads = (("grad_layer_input", grad_layer_input, C), ("grad_next_pre_mix", grad_next_pre_mix, n),
             ("grad_h_post", grad_h_post, n), ("grad_h_res", grad_h_res, n * n))
    _check_mhc_saved(x, n, D, compute, proj, rstd, grads, op)
    return (contiguous_like(x), contiguous_like(pre_mix), contiguous_like(phi), contiguous_like(alpha),
            contiguous_like(bias))


def _mhc_pre_shifted_setup_context(ctx, inputs, output):
    x, pre_mix, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult = inputs
    proj, rstd = output[4], output[5]
    # Saved: the inputs (alive anyway), proj and rstd; next_pre_mix is recomputed from proj.
    ctx.save_for_backward(x, pre_mix, phi, alpha, bias, proj, rstd)
    ctx.mark_non_differentiable(proj, rstd)
    # An unused output's gradient stays None (the backward ops take None as zero) instead of
    # materialised zeros, which would be plain tensors next to DTensor inputs.
    ctx.set_materialize_grads(False)
    ctx.args = (sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult)


@first_order_only("hcext::mhc_pre_shifted")
def _mhc_pre_shifted_backward(ctx, g_layer_input, g_post, g_res, g_next_pre_mix, _g_proj, _g_rstd):
    x, pre_mix, phi, alpha, bias, proj, rstd = ctx.saved_tensors
    gx, gmix, gphi, galpha, gbias = torch.ops.hcext.mhc_shifted_backward.default(
        x, pre_mix, phi, alpha, bias, proj, rstd, g_layer_input, g_next_pre_mix, g_post, g_res, *ctx.args
    )
    return gx, gmix, gphi, galpha, gbias, None, None, None, None, None


torch.library.register_autograd(
    "hcext::mhc_pre_shifted_fwd", _mhc_pre_shifted_backward, setup_context=_mhc_pre_shifted_setup_context
)


@fake_kernel("hcext::mhc_post_pre_shifted_fwd")
def _mhc_post_pre_shifted_fwd_fake(
    f, x, h_post, h_res, pre_mix, phi, alpha, bias, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6,
    pre_eps=1e-6, post_mult=2.0,
):
    op = "hcext::mhc_post_pre_shifted"
    n, C, D, compute = _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    check_streams_coef(pre_mix, "pre_mix", 1, x, op)
    _check_mhc_scalars(pre_eps, post_mult, op, norm_eps)
    return (contiguous_like(x), per_token(x, x.dtype, C), per_token(x, compute, n), per_token(x, compute, n, n),
            per_token(x, compute, n), per_token(x, compute, D), per_token(x, compute))


@fake_kernel("hcext::mhc_post_pre_shifted_backward")
def _mhc_post_pre_shifted_backward_fake(
    grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next, grad_next_pre_mix, f, x, h_post, h_res, pre_mix,
    x_next, phi, alpha, bias, proj, rstd, sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult,
    output_mask=(True, True, True, True, True),
):
    op = "hcext::mhc_post_pre_shifted_backward"
    n, C, D, compute = _check_mhc_post_pre_args(f, x, h_post, h_res, phi, alpha, bias, sinkhorn_iters, sinkhorn_eps, op)
    check_streams_coef(pre_mix, "pre_mix", 1, x, op)
    _check_mhc_scalars(pre_eps, post_mult, op)
    _check_boundary_backward(x, x_next, grad_x_next, op)
    grads = (("grad_layer_input", grad_layer_input, C), ("grad_h_post_next", grad_h_post_next, n),
             ("grad_h_res_next", grad_h_res_next, n * n), ("grad_next_pre_mix", grad_next_pre_mix, n))
    _check_mhc_saved(x_next, n, D, compute, proj, rstd, grads, op)
    return (
        *(grad_or_skipped(m, t) for m, t in zip(output_mask, (f, x, h_post, h_res, pre_mix))),
        contiguous_like(phi),
        contiguous_like(alpha),
        contiguous_like(bias),
    )


def _mhc_post_pre_shifted_setup_context(ctx, inputs, output):
    (f, x, h_post, h_res, pre_mix, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps,
     post_mult) = inputs
    x_next, proj, rstd = output[0], output[5], output[6]
    ctx.save_for_backward(f, x, h_post, h_res, pre_mix, x_next, phi, alpha, bias, proj, rstd)
    ctx.mark_non_differentiable(proj, rstd)
    # An unused output's gradient stays None (the backward ops take None as zero) instead of
    # materialised zeros, which would be plain tensors next to DTensor inputs.
    ctx.set_materialize_grads(False)
    ctx.args = (sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult)


@first_order_only("hcext::mhc_post_pre_shifted")
def _mhc_post_pre_shifted_backward(ctx, g_x_next, g_layer_input, g_post, g_res, g_next_pre_mix, _g_proj, _g_rstd):
    f, x, h_post, h_res, pre_mix, x_next, phi, alpha, bias, proj, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:5])
    gf, gx, ghp, ghr, gmix, gphi, galpha, gbias = torch.ops.hcext.mhc_post_pre_shifted_backward.default(
        g_x_next, g_layer_input, g_post, g_res, g_next_pre_mix, f, x, h_post, h_res, pre_mix, x_next, phi, alpha,
        bias, proj, rstd, *ctx.args, mask,
    )
    keep = lambda g, wanted: g if wanted else None  # noqa: E731
    return (
        keep(gf, mask[0]), keep(gx, mask[1]), keep(ghp, mask[2]), keep(ghr, mask[3]), keep(gmix, mask[4]), gphi,
        galpha, gbias, None, None, None, None, None,
    )


torch.library.register_autograd(
    "hcext::mhc_post_pre_shifted_fwd", _mhc_post_pre_shifted_backward, setup_context=_mhc_post_pre_shifted_setup_context
)
