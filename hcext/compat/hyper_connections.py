"""Drop-in replacement for the ``hyper-connections`` package (lucidrains, v0.4.x), backed by
hcext's kernels. Switch one import and keep your checkpoints::

    # from hyper_connections import get_init_and_expand_reduce_stream_functions, mHC
    from hcext.compat.hyper_connections import get_init_and_expand_reduce_stream_functions, mHC

Same public API (constructor arguments and defaults, ``(branch_input, add_residual)`` and
branch-wrapping modes, ``decorate_branch``), same streams-folded-into-batch layout
(``expand: b ... -> (b s) ...``, ``reduce: (b s) ... -> b ...`` by summing), same parameter
names and shapes (a ``state_dict`` saved with the original loads with ``strict=True``) and
the same numbers (fp32 forward and gradients within 1e-5, tests/test_compat.py).

How their computation maps onto hcext's ops (every "switch" used, and why it is exact):

* Their ``RMSNorm`` is ``F.normalize(x, dim=-1) * sqrt(d) * (gamma + 1)``, i.e.
  ``x * rsqrt(mean(x²)) * (gamma + 1)`` with ``‖x‖`` clamped at 1e-12. It is hc_coeffs' rms
  norm with ``norm_weight = gamma + 1`` (gamma gets its gradient through the sum) and
  ``norm_eps = 1e-24 / d`` (the clamp squared, over d): equal to rounding for any
  non-negligible stream, and 0 (not NaN) for an all-zero stream, as theirs.
* HC: ``α = s_α·act(H̄ W_α) + static_alpha``, ``β = s_β·act(H̄ W_β) + static_beta`` is exactly
  :func:`hcext.ops.hc_coeffs` (same parameter layout, ``use_tanh = tanh``). Their
  ``einsum(alpha, residuals)`` gives ``h_pre = α[:, 0]`` and ``h_res[dst, src] = α[src, 1+dst]``,
  which hc_coeffs returns; the branch input is :func:`hcext.ops.stream_aggregate` and the
  residual mix + depth connection is one :func:`hcext.ops.stream_mix_expand` (the original
  mixes before the branch and adds after it; the sum is the same).
* mHC (their variant, not the paper's: per-stream coefficients from each normed stream,
  not from the flattened streams): the logits are hc_coeffs with ``use_tanh=False``; their two
  alpha scales (``pre_branch_scale`` on column 0, ``residual_scale`` on columns 1..n) are
  folded into the dynamic weight column-wise (``dynamic_alpha = W_α · [s_pre, s_res, ...]``,
  ``alpha_scale = 1``), ``h_post_scale`` is hc_coeffs' ``beta_scale``. Then
  ``h_pre = σ``, ``h_post = 2σ`` (no +1e-6) and
  ``h_res = hcext.ops.sinkhorn(logits[src, dst], iters, eps=0).mT``: their Sinkhorn
  (``exp(ℓ - max over dim -2)``, then ``iters`` times L1-normalise dim -2 then dim -1) is
  hcext's iteration (softmax over dim -2, normalise dim -1, then ``iters - 1`` times dim -2,
  dim -1) with ``eps = 0``, applied to their ``[src, dst]`` matrix, so hcext's ``[dst, src]``
  matrix is its transpose. Their L1 ``normalize`` clamps denominators at 1e-12 where hcext's
  eps=0 divides exactly: equal unless a normalised sum underflows below 1e-12.
  ``log_domain_sinkhorn=True`` runs the same iteration in log space: mathematically the
  same matrix, so it maps to the same op (agreement to fp32 rounding, tested).
  No C++ change was needed.

``width_connection`` / ``depth_connection`` are the package's public methods, with its
arguments and results: ``width_connection(residuals)`` takes the folded ``(b s) ... d``
residuals and returns ``(branch_input [b, ..., d], H_res-mixed residuals (b s) ... d,
dict(beta=[b, ..., 1, s, 1]))`` (``beta=None`` without ``add_branch_out_to_residual``), all
in the residuals' dtype; ``depth_connection(branch_output, residuals, beta=...)`` returns
``residuals + beta * branch_output``, folded, in the residuals' dtype. The caller may pass
any residuals of that layout (its own, or the mixed ones). They run on hcext's ops: the
coefficients on hc_coeffs (+ sinkhorn), the branch input on stream_aggregate, the mix and the
depth connection each on stream_mix_expand (the mix with a zero branch output, the depth
connection with an identity ``H_res``). ``forward`` (both calling conventions) keeps the
fused path: the width connection returns the un-mixed streams and the coefficients, and one
stream_mix_expand does ``H_res x + beta f`` after the branch. A subclass that overrides
``width_connection`` or ``depth_connection`` gets its methods called by ``forward``, as in
the package.

Differences that remain (never silent for fp32):
* bf16/fp16 inputs: all coefficient math and the mixes are fp32 with one rounding of each
  output (the original mHC rounds ``H_res x`` and ``β f`` separately; its HC computes in the
  parameters' dtype, and fails on fp16/bf16 input with fp32 parameters, which hcext accepts),
  so low-precision results differ by rounding.
* Unsupported arguments raise ``NotImplementedError`` naming them: ``num_fracs > 1``,
  ``channel_first=True`` (HC/mHC), ``num_input_views > 1``, a ``depth_residual_fn`` other
  than addition.
"""

from __future__ import annotations

import operator
from functools import partial
from random import randrange
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import Module
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import ops

__all__ = [
    "HyperConnections",
    "ManifoldConstrainedHyperConnections",
    "mHC",
    "Residual",
    "StreamEmbed",
    "AttentionPoolReduceStream",
    "ExpandStreams",
    "ReduceStreams",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
    "mc_get_expand_reduce_stream_functions",
    "mc_get_init_and_expand_reduce_stream_functions",
    "sinkhorn_knopps",
    "log_domain_sinkhorn_knopps",
    "add",
]


def add(x, y):
    """The default ``depth_residual_fn`` (the only one supported: it is fused into the kernel)."""
    return x + y


def _is_addition(fn) -> bool:
    if fn in (add, operator.add, torch.add):
        return True
    # The original package's own `add` helper (so partials built against it keep working).
    return getattr(fn, "__name__", None) == "add" and getattr(fn, "__module__", "").startswith("hyper_connections")


def _unsupported(cls: str, arg: str, value, why: str = ""):
    """``cls``: a class name of this module, or ``module.Class`` for another compat module."""
    where = cls if "." in cls else f"hyper_connections.{cls}"
    raise NotImplementedError(
        f"hcext.compat.{where}: {arg}={value!r} is not supported by hcext's kernels{why}; "
        f"use the original `hyper-connections` package for it"
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# layout: the original folds the streams into the batch dim, `(b s) ... d`; hcext's ops
# take streams next to the channels, `[b, ..., s, d]`.


def _unfold_streams(residuals: Tensor, num_streams: int, contiguous: bool = True) -> Tensor:
    """``(b s) ... d -> b ... s d`` (contiguous by default: it feeds three ops; hcext's stream
    ops take any strides)."""
    if residuals.shape[0] % num_streams != 0:
        raise ValueError(
            f"hcext.compat.hyper_connections: the batch dim ({residuals.shape[0]}) must be a multiple of "
            f"num_streams ({num_streams}): expand the input with the expand function first"
        )
    x = residuals.unflatten(0, (-1, num_streams)).movedim(1, -2)
    return x.contiguous() if contiguous else x


def _fold_streams(x: Tensor) -> Tensor:
    """``b ... s d -> (b s) ... d``."""
    return x.movedim(-2, 1).flatten(0, 1)


# ---------------------------------------------------------------------------------------
# expand / reduce


class ExpandStreams(Module):
    """``b ... -> (b s) ...``: every batch element copied to its s streams (consecutive rows)."""

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def forward(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.num_streams, dim=0)


class ReduceStreams(Module):
    """``(b s) ... -> b ...`` by summing the streams (HC's output reduction)."""

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(0, (-1, self.num_streams)).sum(1)


def get_expand_reduce_stream_functions(num_streams, add_stream_embed=False, dim=None, disable=False):
    if disable:
        return (nn.Identity(), nn.Identity())
    if add_stream_embed:
        assert dim is not None, (
            "`dim` must be passed into get_init_and_expand_reduce_stream_functions for returning an expansion "
            "function with stream embeddings added"
        )
        expand_fn = StreamEmbed(num_streams, dim, expand_to_streams=True)
    else:
        expand_fn = ExpandStreams(num_streams)
    return expand_fn, ReduceStreams(num_streams)


def get_init_and_expand_reduce_stream_functions(
    num_streams, num_fracs=1, dim=None, add_stream_embed=False, disable=None
):
    disable = (num_streams == 1 and num_fracs == 1) if disable is None else disable
    klass = Residual if disable else HyperConnections
    init_fn = partial(klass, num_streams, num_fracs=num_fracs)
    expand_reduce = get_expand_reduce_stream_functions(num_streams, add_stream_embed=add_stream_embed, dim=dim, disable=disable)
    if dim is not None:
        init_fn = partial(init_fn, dim=dim)
    return (init_fn, *expand_reduce)


def mc_get_expand_reduce_stream_functions(num_streams, add_stream_embed=False, dim=None, disable=False):
    return get_expand_reduce_stream_functions(num_streams, add_stream_embed=add_stream_embed, dim=dim, disable=disable)


def mc_get_init_and_expand_reduce_stream_functions(
    num_streams, num_fracs=1, dim=None, add_stream_embed=False, disable=None, sinkhorn_iters=20, **kwargs
):
    disable = (num_streams == 1 and num_fracs == 1) if disable is None else disable
    klass = Residual if disable else ManifoldConstrainedHyperConnections
    init_fn = partial(klass, num_streams, num_fracs=num_fracs, sinkhorn_iters=sinkhorn_iters, **kwargs)
    expand_reduce = get_expand_reduce_stream_functions(num_streams, add_stream_embed=add_stream_embed, dim=dim, disable=disable)
    if dim is not None:
        init_fn = partial(init_fn, dim=dim)
    return (init_fn, *expand_reduce)


# ---------------------------------------------------------------------------------------
# shared pieces


class RMSNorm(Module):
    """Their norm's parameter (``gamma``, zero-init, applied as ``gamma + 1``). The norm itself
    runs inside ``hcext.ops.hc_coeffs`` (see the module docstring)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:  # the original's formula, for users who call it
        return nn.functional.normalize(x, dim=-1) * self.scale * (self.gamma + 1)

    def hc_norm_args(self, compute: torch.dtype):
        """``(norm_weight, norm_eps)`` for hc_coeffs' rms norm equal to this norm."""
        return (self.gamma.to(compute) + 1), 1e-24 / self.gamma.shape[0]


class _BranchMixin:
    """The two calling conventions of the original: with a ``branch`` the module maps
    residuals to residuals; without, it returns ``(branch_input, add_residual)``.

    ``forward`` runs ``_fused_width_connection`` / ``_fused_depth_connection`` (the mix deferred
    to after the branch, one kernel for ``H_res x + beta f``), unless the class overrides the
    public ``width_connection`` / ``depth_connection``: then those, as the package does."""

    def decorate_branch(self, branch: Callable):
        assert self.branch is None, "branch was already wrapped on init"

        def forward_and_add_residual(residual, *args, **kwargs):
            branch_input, add_residual = self.forward(residual)
            branch_output = branch(branch_input, *args, **kwargs)
            return add_residual(branch_output)

        return forward_and_add_residual

    def _connections(self):
        cls, base = type(self), self._fused_base
        if cls.width_connection is base.width_connection and cls.depth_connection is base.depth_connection:
            return self._fused_width_connection, self._fused_depth_connection
        return self.width_connection, self.depth_connection

    def forward(self, residuals, *branch_args, **branch_kwargs):
        width_connection, depth_connection = self._connections()
        branch_input, residuals, residual_kwargs = width_connection(residuals)

        def add_residual_fn(branch_out):
            if not getattr(self, "add_branch_out_to_residual", True):
                return branch_out
            (branch_out, *rest), tree_spec = tree_flatten(branch_out)
            branch_out = depth_connection(branch_out, residuals, **residual_kwargs)
            return tree_unflatten((branch_out, *rest), tree_spec)

        if self.branch is None:
            return branch_input, add_residual_fn
        branch_output = self.branch(branch_input, *branch_args, **branch_kwargs)
        return add_residual_fn(branch_output)


def _width_outputs(x: Tensor, h_pre: Tensor, h_post: Optional[Tensor], h_res: Tensor):
    """The package's width-connection results for streams ``x [..., s, d]`` and hcext's
    coefficients, on hcext's ops, all in x's dtype: ``(branch_input [..., d], H_res x
    [..., s, d], beta [..., s] or None)``. ``H_res x`` is stream_mix_expand with a zero branch
    output (a stride-0 view: no memory) and ``h_post = 0``."""
    n, d = x.shape[-2], x.shape[-1]
    branch_input = ops.stream_aggregate(x, h_pre.contiguous())
    zero_branch = x.new_zeros(()).expand(*x.shape[:-2], d)
    mixed = ops.stream_mix_expand(zero_branch, x, h_res.new_zeros(n), h_res)
    beta = None if h_post is None else h_post.to(x.dtype)
    return branch_input, mixed, beta


def _depth_output(branch_output: Tensor, x: Tensor, h_post: Tensor) -> Tensor:
    """``x + h_post ⊗ branch_output`` for streams ``x [..., s, d]`` (any residuals the caller
    passes) and ``h_post`` broadcastable to ``[..., s]``: stream_mix_expand with a shared
    identity ``H_res``. fp32 math, one rounding to x's dtype."""
    n, d = x.shape[-2], x.shape[-1]
    c = _compute_dtype(x.dtype)
    h_post = h_post.to(c)
    if tuple(h_post.shape) != tuple(x.shape[:-1]):
        h_post = h_post.expand(*x.shape[:-1])  # broadcasts as the package's einsum does
    f = branch_output.to(x.dtype)
    if tuple(f.shape) != (*x.shape[:-2], d):
        f = f.expand(*x.shape[:-2], d)
    return ops.stream_mix_expand(f, x, h_post.contiguous(), torch.eye(n, dtype=c, device=x.device))


def _beta_to_h_post(beta: Tensor, what: str) -> Tensor:
    """The package's ``beta [..., 1, s, 1]`` (no fractions) as hcext's ``h_post [..., s]``."""
    if beta is None or beta.dim() < 3 or beta.shape[-1] != 1 or beta.shape[-3] != 1:
        shape = None if beta is None else list(beta.shape)
        raise ValueError(
            f"hcext.compat.hyper_connections.{what}.depth_connection: expected beta of shape [b, ..., 1, s, 1] "
            f"(as width_connection returns it), got {shape}"
        )
    return beta[..., 0, :, 0]


class Residual(_BranchMixin, Module):
    """A plain residual connection with the same interface (``disable=True``, or n = 1)."""

    def __init__(self, *args, branch: Optional[Module] = None, residual_transform: Optional[Module] = None, **kwargs):
        super().__init__()
        self.branch = branch
        self.residual_transform = nn.Identity() if residual_transform is None else residual_transform

    def width_connection(self, residuals):
        return residuals, residuals, dict()

    def depth_connection(self, branch_output, residuals):
        return branch_output + self.residual_transform(residuals)

    # nothing to fuse: forward runs the public methods
    _fused_width_connection = width_connection
    _fused_depth_connection = depth_connection


Residual._fused_base = Residual


def _check_common(cls, dim, num_residual_streams, num_fracs, channel_first, num_input_views, depth_residual_fn):
    assert num_fracs >= 1
    if num_fracs != 1:
        _unsupported(cls, "num_fracs", num_fracs, " (Frac-Connections)")
    if channel_first:
        _unsupported(cls, "channel_first", channel_first)
    assert num_input_views >= 1
    if num_input_views != 1:
        _unsupported(cls, "num_input_views", num_input_views)
    if not _is_addition(depth_residual_fn):
        _unsupported(cls, "depth_residual_fn", depth_residual_fn, " (only addition, which is fused into the mix)")
    assert num_residual_streams > 0, "`num_residual_streams` must be greater than 0"
    if num_residual_streams > 32:
        _unsupported(cls, "num_residual_streams", num_residual_streams, " (at most 32)")


# ---------------------------------------------------------------------------------------
# Hyper-Connections (arXiv 2409.19606, Alg. 2)


class HyperConnections(_BranchMixin, Module):
    def __init__(
        self,
        num_residual_streams,
        *,
        dim,
        branch: Optional[Module] = None,
        layer_index=None,
        tanh=True,
        channel_first=False,
        dropout=0.0,
        add_branch_out_to_residual=True,
        num_input_views=1,
        depth_residual_fn=add,
        num_fracs=1,
    ):
        super().__init__()
        _check_common("HyperConnections", dim, num_residual_streams, num_fracs, channel_first, num_input_views,
                      depth_residual_fn)
        n = num_residual_streams
        self.branch = branch
        self.tanh = tanh
        self.num_fracs, self.has_fracs = num_fracs, False
        self.norm = RMSNorm(dim)
        self.num_residual_streams = n
        # As the original: randrange is drawn even when layer_index is given, so that the
        # Python RNG stream (and every later random layer index) stays the same.
        fallback = randrange(n)
        init_residual_index = (fallback if layer_index is None else layer_index) % n
        self.num_input_views = num_input_views

        init_alpha0 = torch.zeros((n, 1))
        init_alpha0[init_residual_index, :] = 1.0
        self.static_alpha = nn.Parameter(torch.cat((init_alpha0, torch.eye(n)), dim=1))
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, n + 1))
        self.dynamic_alpha_scale = nn.Parameter(torch.ones(()) * 1e-2)

        self.add_branch_out_to_residual = add_branch_out_to_residual
        if add_branch_out_to_residual:
            self.static_beta = nn.Parameter(torch.ones(n))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
            self.dynamic_beta_scale = nn.Parameter(torch.ones(()) * 1e-2)

        self.dropout = nn.Dropout(dropout)
        self.channel_first = channel_first
        self.depth_residual_fn = depth_residual_fn

    def coefficients(self, x: Tensor):
        """``(h_pre, h_post, h_res[dst, src])`` for streams ``x [b, ..., s, d]`` (hcext layout)."""
        c = _compute_dtype(x.dtype)
        norm_weight, norm_eps = self.norm.hc_norm_args(c)
        if self.add_branch_out_to_residual:
            static_beta, dynamic_beta = self.static_beta.to(c), self.dynamic_beta_fn.to(c)
            beta_scale = self.dynamic_beta_scale.to(c)
        else:  # no beta parameters: h_post is unused
            static_beta, dynamic_beta, beta_scale = x.new_ones(self.num_residual_streams, dtype=c), None, None
        return ops.hc_coeffs(
            x, self.static_alpha.to(c), static_beta, self.dynamic_alpha_fn.to(c), dynamic_beta,
            self.dynamic_alpha_scale.to(c), beta_scale, norm_weight, None, "rms", norm_eps, bool(self.tanh),
        )

    # The package's public methods (see the module docstring): folded residuals in and out.

    def width_connection(self, residuals):
        """``(branch_input [b, ..., d], H_res-mixed residuals (b s) ... d, dict(beta=[b, ..., 1, s, 1]
        or None))`` for folded ``residuals (b s) ... d``, all in the residuals' dtype."""
        return _folded_width(self, _unfold_streams(residuals, self.num_residual_streams))

    def depth_connection(self, branch_output, residuals, *, beta):
        """``residuals + beta * branch_output`` (folded ``(b s) ... d``, the residuals' dtype), then dropout."""
        return _folded_depth(self, "HyperConnections", branch_output, residuals, beta)

    # The fused path of forward: the mix is deferred to after the branch.

    def _fused_width_connection(self, residuals):
        x = _unfold_streams(residuals, self.num_residual_streams)
        h_pre, h_post, h_res = self.coefficients(x)
        branch_input = ops.stream_aggregate(x, h_pre)
        return branch_input, x, dict(h_post=h_post, h_res=h_res)

    def _fused_depth_connection(self, branch_output, streams, *, h_post, h_res):
        out = ops.stream_mix_expand(branch_output.to(streams.dtype), streams, h_post, h_res)
        return self.dropout(_fold_streams(out))


def _folded_width(module, x: Tensor):
    """width_connection of the folded-layout classes, for unfolded streams ``x [b, ..., s, d]``."""
    h_pre, h_post, h_res = module.coefficients(x)
    if not module.add_branch_out_to_residual:
        h_post = None
    branch_input, mixed, beta = _width_outputs(x, h_pre, h_post, h_res)
    if beta is not None:
        beta = beta[..., None, :, None]  # the package's [b, ..., f1, s, f2] with one fraction
    return branch_input, _fold_streams(mixed), dict(beta=beta)


def _folded_depth(module, what: str, branch_output: Tensor, residuals: Tensor, beta: Tensor) -> Tensor:
    assert module.add_branch_out_to_residual
    x = _unfold_streams(residuals, module.num_residual_streams, contiguous=False)
    out = _depth_output(branch_output, x, _beta_to_h_post(beta, what))
    return module.dropout(_fold_streams(out))


HyperConnections._fused_base = HyperConnections
HyperConnections.get_expand_reduce_stream_functions = staticmethod(get_expand_reduce_stream_functions)
HyperConnections.get_init_and_expand_reduce_stream_functions = staticmethod(get_init_and_expand_reduce_stream_functions)


# ---------------------------------------------------------------------------------------
# mHC, as the hyper-connections package defines it


def sinkhorn_knopps(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """The package's ``sinkhorn_knopps`` (``manifold_constrained_hyper_connections``) on hcext's
    Sinkhorn kernel: ``log_alpha [..., n, n]`` in their orientation, the result in its dtype.
    ``iters <= 0``: theirs runs no iteration and returns ``exp(log_alpha - max over dim -2)``."""
    if iters <= 0:
        x = log_alpha.float()
        return (x - x.amax(dim=-2, keepdim=True).detach()).exp().to(log_alpha.dtype)
    return ops.sinkhorn(log_alpha, iters, 0.0).to(log_alpha.dtype)


def log_domain_sinkhorn_knopps(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """The package's log-domain Sinkhorn: the same matrix (see the module docstring), the same
    kernel. ``iters <= 0``: theirs returns ``exp(log_alpha)``."""
    if iters <= 0:
        return log_alpha.float().exp().to(log_alpha.dtype)
    return ops.sinkhorn(log_alpha, iters, 0.0).to(log_alpha.dtype)


def _mhc_coefficients(module, x: Tensor, beta_params):
    """The package's mHC coefficients ``(h_pre, h_post, h_res[dst, src])`` (fp32; fp64 for fp64
    x) from the normed streams ``x [..., s, d]``, on hc_coeffs + ``module._constrain_residual``.
    ``beta_params``: ``(static_beta [s], dynamic_beta [d])``, or None (h_post is None). Reads
    ``norm``, ``static_alpha``, ``dynamic_alpha_fn [p, d, s+1]``, ``pre_branch_scale`` and
    ``residual_scale`` from the module (mHC and mHCv2 share them)."""
    n = module.num_residual_streams
    c = _compute_dtype(x.dtype)
    norm_weight, norm_eps = module.norm.hc_norm_args(c)
    # Their per-column alpha scale, folded into the dynamic weight (hc_coeffs has one scale).
    col_scale = torch.cat((module.pre_branch_scale.to(c), module.residual_scale.to(c).expand(n)))
    proposals = module.dynamic_alpha_fn.shape[0]
    h_pre = h_res = h_post = None
    for p in range(proposals):
        with_beta = p == 0 and beta_params is not None
        if with_beta:
            static_beta, dynamic_beta = (t.to(c) for t in beta_params)
            beta_scale = module.h_post_scale.to(c)
        else:
            static_beta, dynamic_beta, beta_scale = x.new_zeros(n, dtype=c), None, None
        pre_logit, post_logit, res_logit = ops.hc_coeffs(
            x, module.static_alpha.to(c), static_beta, module.dynamic_alpha_fn[p].to(c) * col_scale, dynamic_beta,
            None, beta_scale, norm_weight, None, "rms", norm_eps, False,
        )
        pre = torch.sigmoid(pre_logit)
        res = module._constrain_residual(res_logit.mT)  # hc_coeffs gives [dst, src]; theirs is [src, dst]
        h_pre = pre if h_pre is None else h_pre + pre
        h_res = res if h_res is None else h_res + res
        if with_beta:
            h_post = 2.0 * torch.sigmoid(post_logit)
    if proposals > 1:
        h_pre = h_pre / proposals
        h_res = h_res / proposals
    return h_pre, h_post, h_res.to(c).contiguous()


class ManifoldConstrainedHyperConnections(_BranchMixin, Module):
    def __init__(
        self,
        num_residual_streams,
        *,
        dim,
        branch: Optional[Module] = None,
        layer_index=None,
        channel_first=False,
        dropout=0.0,
        residual_transform: Optional[Module] = None,
        add_branch_out_to_residual=True,
        num_input_views=1,
        depth_residual_fn=add,
        num_fracs=1,
        sinkhorn_iters=20,
        log_domain_sinkhorn=False,
        residual_mix_constraint_fn: Optional[Callable] = None,
        forward_method_names: tuple = (),
        num_dynamic_alpha_proposals=1,
    ):
        super().__init__()
        _check_common("ManifoldConstrainedHyperConnections", dim, num_residual_streams, num_fracs, channel_first,
                      num_input_views, depth_residual_fn)
        n = num_residual_streams
        self.branch = branch
        self.num_fracs, self.has_fracs = num_fracs, False
        self.norm = RMSNorm(dim)
        self.num_residual_streams = n
        fallback = randrange(n)  # drawn unconditionally, as the original (see HyperConnections)
        init_residual_index = (fallback if layer_index is None else layer_index) % n
        self.num_input_views = num_input_views
        self.has_dynamic_alpha_proposals = num_dynamic_alpha_proposals > 1
        self.num_dynamic_alpha_proposals = num_dynamic_alpha_proposals

        init_alpha0 = torch.zeros((n, 1))
        init_alpha0[init_residual_index, :] = 1.0
        self.static_alpha = nn.Parameter(torch.cat((init_alpha0, torch.eye(n)), dim=1))
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(num_dynamic_alpha_proposals, dim, n + 1))
        self.pre_branch_scale = nn.Parameter(torch.ones(1) * 1e-2)
        self.residual_scale = nn.Parameter(torch.ones(1) * 1e-2)

        self.add_branch_out_to_residual = add_branch_out_to_residual
        if add_branch_out_to_residual:
            self.static_beta = nn.Parameter(torch.ones(n))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
            self.h_post_scale = nn.Parameter(torch.ones(()) * 1e-2)

        # None: hcext's Sinkhorn kernel (direct or log domain: the same matrix, see the
        # module docstring). A user's constraint runs as given on the [src, dst] logits.
        self.sinkhorn_iters, self.log_domain_sinkhorn = sinkhorn_iters, log_domain_sinkhorn
        self.residual_mix_constraint_fn = residual_mix_constraint_fn

        self.dropout = nn.Dropout(dropout)
        self.channel_first = channel_first
        self.residual_transform = nn.Identity() if residual_transform is None else residual_transform
        self.depth_residual_fn = depth_residual_fn

        self.forward_method_names = forward_method_names
        for name in forward_method_names:
            assert not hasattr(self, name)
            setattr(self, name, getattr(self.branch, name))

    def _constrain_residual(self, logits_src_dst: Tensor) -> Tensor:
        """Their Sinkhorn on ``[src, dst]`` logits, returned as hcext's ``h_res[dst, src]``."""
        if self.residual_mix_constraint_fn is not None:
            m = self.residual_mix_constraint_fn(logits_src_dst)
        else:
            constrain = log_domain_sinkhorn_knopps if self.log_domain_sinkhorn else sinkhorn_knopps
            m = constrain(logits_src_dst, self.sinkhorn_iters)
        return m.mT

    def coefficients(self, x: Tensor):
        """``(h_pre, h_post, h_res[dst, src])`` for streams ``x [b, ..., s, d]`` (hcext layout)."""
        beta = (self.static_beta, self.dynamic_beta_fn) if self.add_branch_out_to_residual else None
        return _mhc_coefficients(self, x, beta)

    # The package's public methods (see the module docstring): folded residuals in and out.

    def width_connection(self, residuals):
        """``(branch_input [b, ..., d], H_res-mixed residuals (b s) ... d, dict(beta=[b, ..., 1, s, 1]
        or None))`` for folded ``residuals (b s) ... d`` (after ``residual_transform``), all in
        the residuals' dtype."""
        residuals = self.residual_transform(residuals)
        return _folded_width(self, _unfold_streams(residuals, self.num_residual_streams))

    def depth_connection(self, branch_output, residuals, *, beta):
        """``residuals + beta * branch_output`` (folded ``(b s) ... d``, the residuals' dtype), then dropout."""
        return _folded_depth(self, "ManifoldConstrainedHyperConnections", branch_output, residuals, beta)

    # The fused path of forward: the mix is deferred to after the branch.

    def _fused_width_connection(self, residuals):
        residuals = self.residual_transform(residuals)
        x = _unfold_streams(residuals, self.num_residual_streams)
        h_pre, h_post, h_res = self.coefficients(x)
        branch_input = ops.stream_aggregate(x, h_pre.contiguous())
        return branch_input, x, dict(h_post=h_post, h_res=h_res)

    def _fused_depth_connection(self, branch_output, streams, *, h_post, h_res):
        out = ops.stream_mix_expand(branch_output.to(streams.dtype), streams, h_post, h_res)
        return self.dropout(_fold_streams(out))


ManifoldConstrainedHyperConnections._fused_base = ManifoldConstrainedHyperConnections
mHC = ManifoldConstrainedHyperConnections
ManifoldConstrainedHyperConnections.get_expand_reduce_stream_functions = staticmethod(mc_get_expand_reduce_stream_functions)
ManifoldConstrainedHyperConnections.get_init_and_expand_reduce_stream_functions = staticmethod(
    mc_get_init_and_expand_reduce_stream_functions
)


# ---------------------------------------------------------------------------------------
# stream embedding and attention-pool reduction (no kernel needed: plain PyTorch)


class StreamEmbed(Module):
    """Adds a learned embedding per stream (``stream_embed [s, d]``), optionally expanding first."""

    def __init__(self, num_streams, dim, channel_first=False, expand_to_streams=False):
        super().__init__()
        self.channel_first = channel_first
        self.num_streams = num_streams
        self.expand_to_streams = expand_to_streams
        self.stream_embed = nn.Parameter(torch.zeros(num_streams, dim))

    def forward(self, residuals):
        s = self.num_streams
        if self.expand_to_streams:
            residuals = residuals.repeat_interleave(s, dim=0)
        r = residuals.unflatten(0, (-1, s))  # [b, s, ...]
        if self.channel_first:  # [b, s, d, *spatial]
            embed = self.stream_embed.reshape(s, -1, *([1] * (r.dim() - 3)))
        else:  # [b, s, ..., d]
            embed = self.stream_embed.reshape(s, *([1] * (r.dim() - 3)), -1)
        return (r + embed).flatten(0, 1)


class AttentionPoolReduceStream(Module):
    """Reduces the streams with a per-channel softmax over them (``to_attn_logits``, identity init)."""

    def __init__(self, num_streams, dim, channel_first=False):
        super().__init__()
        self.num_streams = num_streams
        self.channel_first = channel_first
        self.to_attn_logits = nn.Linear(dim, dim, bias=False)
        self.to_attn_logits.weight.data.copy_(torch.eye(dim))

    def forward(self, residuals):
        r = residuals.unflatten(0, (-1, self.num_streams))  # [b, s, ...]
        if self.channel_first:
            r = r.movedim(2, -1)  # [b, s, *spatial, d]
        attn = self.to_attn_logits(r).softmax(dim=1)
        out = (r * attn).sum(1)
        if self.channel_first:
            out = out.movedim(-1, 1)
        return out
