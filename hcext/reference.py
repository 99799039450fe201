"""The spec in code: pure-PyTorch, readable, differentiable references for every hcext op.

Every kernel in csrc/ is tested against these functions. They favour clarity over speed.
Layout everywhere: streams ``x`` are ``[..., n, C]`` (n residual streams of width C per
token). Matrices acting on streams follow the mHC paper: ``H[dst, src]``, applied as
``out[dst] = sum_src H[dst, src] * x[src]``.

Papers: HC = "Hyper-Connections", arXiv 2409.19606v3 (ICLR 2025);
mHC = "mHC: Manifold-Constrained Hyper-Connections", arXiv 2512.24880v2.
Conventions that the papers leave open follow DeepSeek's official kernels
(deepseek-ai/TileKernels): Sinkhorn in the direct (not log) domain, starting with a
softmax over the destinations (columns sum to 1) and ending with a row normalisation, eps
after the softmax and in every denominator; ``h_pre = σ(·) + 1e-6``; the RMSNorm's eps inside the rsqrt and
its weight folded into phi; coefficient columns ordered ``[pre n | post n | res n*n]``.
Where hcext differs from that code, on purpose: H_res is stored ``[dst, src]`` (the code
stores its transpose, ``comb[src, dst]``), and the defaults are the paper's (2σ for
h_post and 20 Sinkhorn iterations; the code defaults to 1.0 and 10).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sinkhorn",
    "mhc_coeffs",
    "stream_aggregate",
    "mhc_pre",
    "mhc_post_pre",
    "mhc_pre_shifted",
    "mhc_post_pre_shifted",
    "shifted_initial_pre_mix",
    "stream_mix_expand",
    "hc_coeffs",
    "expand_streams",
    "reduce_streams",
]


def _fp32(t: Tensor) -> Tensor:
    """Coefficient math runs in fp32 (fp64 stays fp64, for gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def sinkhorn(logits: Tensor, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Sinkhorn-Knopp projection onto (nearly) doubly stochastic matrices (mHC Eq. 9).

    ``logits [..., n, n]`` are ``H̃_res[dst, src]``. ``M⁰ = exp(logits)``, then
    ``Mᵗ = T_r(T_c(Mᵗ⁻¹))`` (normalise columns, then rows) for ``t_max = iters`` steps,
    exactly as DeepSeek's official code orders it, in the direct (not log) domain,
    with ``eps`` after the softmax and in every denominator. The last step normalises
    rows, so rows sum to 1 up to eps and columns only approximately.
    Returns fp32 (fp64 for fp64 input).
    """
    P = torch.softmax(_fp32(logits), dim=-2) + eps  # T_c(exp(logits)): columns sum to 1
    P = P / (P.sum(-1, keepdim=True) + eps)  # T_r
    for _ in range(iters - 1):
        P = P / (P.sum(-2, keepdim=True) + eps)  # T_c
        P = P / (P.sum(-1, keepdim=True) + eps)  # T_r
    return P


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
    """mHC's per-token coefficients (mHC Eq. 7-8, computed with the reordered RMSNorm of Eq. 14-15).

    ``x [..., n, C]`` is flattened to ``x̃ [..., n*C]`` (every coefficient sees every stream).
    ``phi [n*C, n*n + 2n]`` (the RMSNorm weight folded in), ``alpha [3] = (α_pre, α_post, α_res)``,
    ``bias [n*n + 2n]``; columns are split ``[pre n | post n | res n*n]``, res row-major ``H_res[dst, src]``.

        r  = rsqrt(mean(x̃²) + norm_eps)               (RMSNorm, applied after the matmul: Eq. 14-15)
        ℓ  = α_part · (x̃ @ phi) · r + bias              (Eq. 7)
        h_pre  = sigmoid(ℓ_pre) + pre_eps               [..., n]     (Eq. 8; +1e-6 as in the official code)
        h_post = post_mult · sigmoid(ℓ_post)            [..., n]     (Eq. 8: 2σ)
        h_res  = sinkhorn(ℓ_res as n×n)                 [..., n, n]  (Eq. 8-9)

    All math in fp32 (fp64 for fp64 input); the outputs are fp32 (fp64).
    """
    n, C = x.shape[-2], x.shape[-1]
    xf = _fp32(x).reshape(*x.shape[:-2], n * C)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)
    proj = (xf @ _fp32(phi)) * r  # == RMSNorm(x̃) @ phi
    a_pre, a_post, a_res = _fp32(alpha).unbind(0)
    b = _fp32(bias)
    l_pre = a_pre * proj[..., :n] + b[:n]
    l_post = a_post * proj[..., n : 2 * n] + b[n : 2 * n]
    l_res = a_res * proj[..., 2 * n :] + b[2 * n :]
    h_pre = torch.sigmoid(l_pre) + pre_eps
    h_post = post_mult * torch.sigmoid(l_post)
    h_res = sinkhorn(l_res.reshape(*l_res.shape[:-1], n, n), sinkhorn_iters, sinkhorn_eps)
    return h_pre, h_post, h_res


def stream_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """The layer input ``y = H_pre x`` (mHC Eq. 3 / HC width connection ``h₀ = A_mᵀ H``).

    ``y[..., c] = Σ_i h_pre[..., i] · x[..., i, c]``. ``h_pre`` is per token ``[..., n]`` or
    shared by every token ``[n]``. fp32 accumulation, output in x's dtype, shape ``[..., C]``.
    """
    y = (_fp32(h_pre).unsqueeze(-1) * _fp32(x)).sum(-2)
    return y.to(x.dtype)


def stream_mix_expand(f: Tensor, x: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """The residual merge ``x' = H_res x + H_postᵀ f`` (mHC Eq. 3 / HC depth connection).

    ``x'[..., i, c] = Σ_j h_res[..., i, j] · x[..., j, c] + h_post[..., i] · f[..., c]``,
    with ``f [..., C]`` the sub-layer's output. Coefficients per token (``[..., n]``,
    ``[..., n, n]``) or shared (``[n]``, ``[n, n]``). fp32 math, output in x's dtype.
    """
    mixed = _fp32(h_res) @ _fp32(x)  # [..., n, n] @ [..., n, C]
    out = mixed + _fp32(h_post).unsqueeze(-1) * _fp32(f).unsqueeze(-2)
    return out.to(x.dtype)


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
    """Everything an mHC sub-layer needs before its branch F (mHC Eq. 3 and 7-9):
    ``(layer_input = H_pre x  [..., C] in x's dtype, h_post [..., n], h_res [..., n, n])``.
    Then the sub-layer ends with ``stream_mix_expand(F(layer_input), x, h_post, h_res)``.
    """
    h_pre, h_post, h_res = mhc_coeffs(x, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult)
    return stream_aggregate(x, h_pre), h_post, h_res


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
    """The boundary between two mHC sub-layers: layer l's residual merge, then layer l+1's
    ``mhc_pre`` on the new streams. ``-> (x_next, layer_input, h_post_next, h_res_next)``.
    """
    x_next = stream_mix_expand(f, x, h_post, h_res)
    return (x_next, *mhc_pre(x_next, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult))


def shifted_initial_pre_mix(num_streams: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """DeepSeek-V4.1's ``π_0 = e_0``: the first sub-layer's collapse weights, one-hot on
    stream 0, shared by every token (``[n]``): the first layer input is stream 0 (with
    copied-in streams, the embedding itself)."""
    e0 = torch.zeros(num_streams, dtype=dtype, device=device)
    e0[0] = 1
    return e0


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
    """DeepSeek-V4.1's shifted collapse: what an mHC sub-layer k needs before its branch,
    ``-> (layer_input [..., C] in x's dtype, h_post [..., n], h_res [..., n, n], next_pre_mix [..., n])``.

    The coefficients come from the sub-layer's own streams ``x = X_k`` as in :func:`mhc_pre`,
    but the layer input is collapsed with the *previous* sub-layer's pre::

        h_pre, h_post, h_res = mhc_coeffs(x, phi, alpha, bias, ...)
        layer_input  = Σ_i pre_mix[i] · x_i            (stream_aggregate(x, pre_mix), π_k = pre_{k-1})
        next_pre_mix = h_pre                            (π_{k+1}, the next collapse's weights)

    ``pre_mix`` is per token ``[..., n]`` or shared ``[n]``, fp32 (fp64 for fp64 x), the rules
    of :func:`stream_aggregate`'s ``h_pre``; the first sub-layer takes ``π_0 = e_0``
    (:func:`shifted_initial_pre_mix`). The sub-layer ends with
    ``stream_mix_expand(F(layer_input), x, h_post, h_res)`` as before; the network's output is
    the last streams collapsed with the last ``next_pre_mix`` (no learned head).

    Gradients: ``∂x_i`` gets ``pre_mix[i] · g`` from the collapse (plus the coefficients'
    path), ``∂pre_mix[i] = Σ_c g[c] · x[i, c]`` (flowing to the previous sub-layer's pre), and
    ``h_pre`` gets its gradient only through ``next_pre_mix``, i.e. from the next collapse.
    """
    h_pre, h_post, h_res = mhc_coeffs(x, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult)
    return stream_aggregate(x, pre_mix), h_post, h_res, h_pre


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
    """The boundary between two V4.1 (shifted-collapse) mHC sub-layers: layer k's residual
    merge, then layer k+1's :func:`mhc_pre_shifted` on the new streams, collapsed with
    ``pre_mix`` (layer k's ``next_pre_mix``, i.e. ``pre_k``)::

        x_next = stream_mix_expand(f, x, h_post, h_res)
        (layer_input, h_post_next, h_res_next, next_pre_mix) = mhc_pre_shifted(x_next, pre_mix, phi, alpha, bias, ...)

    ``-> (x_next, layer_input, h_post_next, h_res_next, next_pre_mix)``.
    """
    x_next = stream_mix_expand(f, x, h_post, h_res)
    return (
        x_next,
        *mhc_pre_shifted(x_next, pre_mix, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult),
    )


def _stream_norm(
    x: Tensor, norm: str, eps: float, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    """Per-stream norm over C (HC §2.2: H̄ = norm(H)), in fp32."""
    if norm == "rms":
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            out = out * _fp32(weight)
        if bias is not None:
            out = out + _fp32(bias)
        return out
    if norm == "layer":
        return F.layer_norm(
            x, (x.shape[-1],), None if weight is None else _fp32(weight), None if bias is None else _fp32(bias), eps
        )
    raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")


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
    """Original Hyper-Connections coefficients, static and dynamic (HC Eq. 1-7, Alg. 2).

    Parameters in the layout of the ``hyper-connections`` package: ``static_alpha [n, n+1]
    = [A_m | A_r]`` (row i = source stream i), ``static_beta [n] = B``, ``dynamic_alpha
    [C, n+1] = [W_m | W_r]``, ``dynamic_beta [C] = W_β``, ``alpha_scale``/``beta_scale``
    0-dim (s_α, s_β).

    Static HC (no dynamic weights): ``α = static_alpha``, ``β = static_beta``, shared by
    every token. Dynamic HC, per token (Eq. 5-7):

        H̄ = norm(x)                                   per stream over C ("rms" or "layer")
        α = s_α · tanh(H̄ @ W_α) + static_alpha        [..., n, n+1]
        β = s_β · tanh(H̄ @ W_β) + static_beta         [..., n]
    (``use_tanh=False`` drops the tanh: the paper's "w/o tanh" ablation.)

    Returned in hcext's stream-op convention: ``h_pre[i] = α[i, 0]`` (A_m),
    ``h_res[dst, src] = α[src, 1 + dst]`` (A_rᵀ), ``h_post = β`` (B). Shapes ``[n]``,
    ``[n]``, ``[n, n]`` for static HC, ``[..., n]``, ``[..., n]``, ``[..., n, n]`` for dynamic.
    """
    alpha = _fp32(static_alpha)
    beta = _fp32(static_beta)
    if dynamic_alpha is not None or dynamic_beta is not None:
        act = torch.tanh if use_tanh else (lambda t: t)
        xn = _stream_norm(_fp32(x), norm, norm_eps, norm_weight, norm_bias)  # [..., n, C]
        if dynamic_alpha is not None:
            s_a = 1.0 if alpha_scale is None else _fp32(alpha_scale)
            alpha = s_a * act(xn @ _fp32(dynamic_alpha)) + alpha  # [..., n, n+1]
        if dynamic_beta is not None:
            s_b = 1.0 if beta_scale is None else _fp32(beta_scale)
            beta = s_b * act(xn @ _fp32(dynamic_beta)) + beta  # [..., n]
        lead = x.shape[:-2]
        alpha = alpha.expand(*lead, *alpha.shape[-2:])
        beta = beta.expand(*lead, beta.shape[-1])
    h_pre = alpha[..., 0]
    h_res = alpha[..., 1:].transpose(-1, -2)
    return h_pre, beta, h_res


def expand_streams(x: Tensor, n: int) -> Tensor:
    """Network input (HC §2.3): copy the hidden state ``[..., C]`` into n streams ``[..., n, C]``."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def reduce_streams(x: Tensor) -> Tensor:
    """Network output (HC §2.3): sum the streams ``[..., n, C]`` back to ``[..., C]``."""
    return x.sum(-2)
