"""The original Hyper-Connections' coefficients (HC, arXiv 2409.19606v3): hcext::hc_coeffs
(a composite over hcext::hc_coeffs_fwd) and hcext::hc_coeffs_backward: the wrapper, the
fake kernels and the autograd formula. The spec in code is ``hcext.reference.hc_coeffs``.

hc_coeffs_fwd also returns the saved intermediates: ``proj`` ([..., n, K], the K = n+1
and/or 1 dynamic projections of each normalised stream) and ``stats`` ([..., n, 2], the
norm's mean and rstd per stream).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import (
    check_coeff_tensor,
    check_coeff_x,
    check_finite_eps,
    check_optional_grad,
    compute_dtype,
    contiguous_like,
    fake_kernel,
    per_token,
    first_order_only,
)

__all__ = ["hc_coeffs"]

_HC_NORMS = ("rms", "layer")


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


# ---------------------------------------------------------------------------------------
# fake kernels


def _check_hc_args(x, static_alpha, static_beta, optional, norm, op):
    """x, the norm's name and the parameters. ``optional``: the six optional parameters in
    schema order (dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight,
    norm_bias). Returns (n, C, K, compute dtype); K = 0 for static HC."""
    n, C = check_coeff_x(x, op)
    torch._check(norm in _HC_NORMS, lambda: f'{op}: expected norm to be "rms" or "layer", got "{norm}"')
    compute = compute_dtype(x.dtype)
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
        check_coeff_tensor(t, name, x, compute, op)
    K = (n + 1 if dynamic_alpha is not None else 0) + (1 if dynamic_beta is not None else 0)
    return n, C, K, compute


@fake_kernel("hcext::hc_coeffs_fwd")
def _hc_coeffs_fwd_fake(
    x, static_alpha, static_beta, dynamic_alpha=None, dynamic_beta=None, alpha_scale=None, beta_scale=None,
    norm_weight=None, norm_bias=None, norm="rms", norm_eps=1e-6, use_tanh=True,
):
    op = "hcext::hc_coeffs"
    optional = (dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias)
    n, C, K, compute = _check_hc_args(x, static_alpha, static_beta, optional, norm, op)
    check_finite_eps(norm_eps, "norm_eps", op)
    if K == 0:  # static HC: shared coefficients, nothing saved
        new = lambda *shape: x.new_empty(shape, dtype=compute)  # noqa: E731
        return new(n), new(n), new(n, n), new(0), new(0)
    return (per_token(x, compute, n), per_token(x, compute, n), per_token(x, compute, n, n),
            per_token(x, compute, n, K), per_token(x, compute, n, 2))


@fake_kernel("hcext::hc_coeffs_backward")
def _hc_coeffs_backward_fake(
    x, static_alpha, static_beta, dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias,
    proj, stats, grad_h_pre, grad_h_post, grad_h_res, norm, use_tanh, output_mask=(True,) * 9,
):
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
    check_coeff_tensor(proj, "proj", x, compute, op)
    check_coeff_tensor(stats, "stats", x, compute, op)
    for name, g, per_token_numel in (("grad_h_pre", grad_h_pre, n), ("grad_h_post", grad_h_post, n),
                                     ("grad_h_res", grad_h_res, n * n)):
        check_optional_grad(g, name, tokens * per_token_numel, x, op)
    # One gradient per input in schema order: x's contiguous, a parameter's of its shape,
    # an empty [0] for an absent input or one that output_mask did not request.
    grads = []
    for wanted, t in zip(output_mask, (x, static_alpha, static_beta, *optional)):
        if not wanted or t is None:
            grads.append(x.new_empty((0,), dtype=compute))
        elif t is x:
            grads.append(contiguous_like(x))
        else:
            grads.append(t.new_empty(t.shape))
    return tuple(grads)


# ---------------------------------------------------------------------------------------
# autograd


def _hc_coeffs_setup_context(ctx, inputs, output):
    x, static_alpha, static_beta = inputs[:3]
    optional = inputs[3:9]  # dynamic_alpha, dynamic_beta, alpha_scale, beta_scale, norm_weight, norm_bias
    norm, _norm_eps, use_tanh = inputs[9:]
    ctx.static = optional[0] is None and optional[1] is None
    ctx.args = (norm, use_tanh)
    ctx.present = [t is not None for t in optional]
    ctx.mark_non_differentiable(output[3], output[4])
    # An unused output's gradient stays None (the backward ops take None as zero) instead of
    # materialised zeros, which would be plain tensors next to DTensor inputs.
    ctx.set_materialize_grads(False)
    if ctx.static:
        return  # the gradient is the incoming one, rearranged: nothing to save
    # Saved: the inputs (alive anyway), proj (n*K per token) and stats (2n per token).
    given = [t for t in optional if t is not None]
    ctx.save_for_backward(x, static_alpha, static_beta, *given, output[3], output[4])


def _static_hc_backward(ctx, g_pre, g_post, g_res):
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


def _hc_coeffs_backward(ctx, g_pre, g_post, g_res, _g_proj, _g_stats):
    # Static HC's gradient is plain torch ops on [n]-sized tensors: differentiable again.
    if ctx.static:
        return _static_hc_backward(ctx, g_pre, g_post, g_res)
    return _dynamic_hc_backward(ctx, g_pre, g_post, g_res)


@first_order_only("hcext::hc_coeffs")
def _dynamic_hc_backward(ctx, g_pre, g_post, g_res):
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


torch.library.register_autograd("hcext::hc_coeffs_fwd", _hc_coeffs_backward, setup_context=_hc_coeffs_setup_context)
