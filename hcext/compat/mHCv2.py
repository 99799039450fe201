"""Drop-in replacement for ``hyper_connections.mHCv2`` (the package's newer mHC, v0.4.x), backed
by hcext's kernels::

    # from hyper_connections.mHCv2 import get_init_and_expand_reduce_stream_functions, mHC
    from hcext.compat.mHCv2 import get_init_and_expand_reduce_stream_functions, mHC

What mHCv2 changes against ``hyper_connections.manifold_constrained_hyper_connections`` (read
from the package's source), and how each maps onto hcext:

* Layout: the streams are their own dim next to the channels, ``[..., s, d]`` (expand
  ``... d -> ... s d``, reduce ``... s d -> ... d``), not folded into the batch. That is
  hcext's native stream layout: the ops take the residuals as they are, no reshapes.
* The math is the same mHC (for one fraction): per-stream coefficients from each RMS-normed
  stream, ``h_pre = σ``, ``h_post = 2σ``, ``h_res`` = their Sinkhorn of the ``[src, dst]``
  logits, averaged over ``num_dynamic_alpha_proposals`` (h_pre and h_res). So the
  coefficients are :func:`hcext.ops.hc_coeffs` + :func:`hcext.ops.sinkhorn` exactly as in
  :mod:`hcext.compat.hyper_connections` (see its docstring for why each step is exact).
* Parameter shapes (kept, so a ``state_dict`` loads with ``strict=True``): ``static_beta
  [s, 1, 1]`` and ``dynamic_beta_fn [d, 1]`` (the fraction dims), used as ``[s]`` / ``[d]``.
* ``mix_streams_before_norm=True``: a 1x1 ``Conv2d(s, s)`` (``maybe_mix_streams``, Dirac init)
  mixes the streams that feed the norm (only the coefficients see it). Its weight
  ``[dst, src, 1, 1]`` is a shared ``H_res[dst, src]``: :func:`hcext.ops.stream_mix_expand`
  with a zero branch output.
* ``sinkhorn_iters <= 0``: no constraint, the raw logits are ``H_res`` (as theirs).
  ``sinkhorn_knopps`` / ``log_domain_sinkhorn_knopps`` are theirs, on hcext's kernel.
  ``use_triton_sinkhorn=True``: their Triton kernel is the log-domain Sinkhorn, the same
  matrix as hcext's Sinkhorn kernel, which runs on every device here (as with Triton
  installed, it takes precedence over a ``residual_mix_constraint_fn``).
* ``StreamEmbed(num_streams, dim, expand_to_streams)`` and ``AttentionPoolReduceStream(dim)``
  take mHCv2's arguments (no ``channel_first``) and layout.

``width_connection(residuals [..., s, d])`` returns ``(branch_input [..., d], H_res-mixed
residuals [..., s, d], dict(beta=[..., s, 1, 1] or None))`` in the residuals' dtype, and
``depth_connection(branch_output, residuals, beta=...)`` returns ``residuals + beta *
branch_output`` in the residuals' dtype, as the package's; ``forward`` runs the fused path
(one stream_mix_expand after the branch). Unsupported (``NotImplementedError`` naming the
argument): ``num_fracs > 1``, ``num_input_views > 1``, a ``depth_residual_fn`` other than
addition, more than 32 streams.
"""

from __future__ import annotations

from functools import partial
from random import randrange
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import Module

from .. import ops
from .hyper_connections import (
    RMSNorm,
    Residual,
    _BranchMixin,
    _check_common,
    _compute_dtype,
    _depth_output,
    _mhc_coefficients,
    _width_outputs,
    add,
)

__all__ = [
    "ManifoldConstrainedHyperConnections",
    "mHC",
    "Residual",
    "RMSNorm",
    "StreamEmbed",
    "AttentionPoolReduceStream",
    "ExpandStreams",
    "ReduceStreams",
    "get_expand_reduce_stream_functions",
    "get_init_and_expand_reduce_stream_functions",
    "sinkhorn_knopps",
    "log_domain_sinkhorn_knopps",
    "add",
]

_NAME = "mHCv2.ManifoldConstrainedHyperConnections"


# ---------------------------------------------------------------------------------------
# their Sinkhorn functions, on hcext's kernel


def sinkhorn_knopps(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """The package's ``mHCv2.sinkhorn_knopps`` on hcext's Sinkhorn kernel (eps = 0: the same
    matrix, see :mod:`hcext.compat.hyper_connections`): ``log_alpha [..., n, n]`` (their
    orientation, 1 <= n <= 32), the result in its dtype. ``iters <= 0`` returns ``log_alpha``
    unchanged, as theirs."""
    if iters <= 0:
        return log_alpha
    return ops.sinkhorn(log_alpha, iters, 0.0).to(log_alpha.dtype)


def log_domain_sinkhorn_knopps(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """The package's ``mHCv2.log_domain_sinkhorn_knopps``: mathematically the same matrix as
    :func:`sinkhorn_knopps`, so the same kernel. ``iters <= 0`` returns ``log_alpha``."""
    return sinkhorn_knopps(log_alpha, iters)


# ---------------------------------------------------------------------------------------
# expand / reduce: ``... d <-> ... s d``


class ExpandStreams(Module):
    """``... d -> ... s d``: every stream a copy of the input (a view, as einops' repeat)."""

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.num_streams, x.shape[-1])


class ReduceStreams(Module):
    """``... s d -> ... d`` by summing the streams."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(-2)


def get_expand_reduce_stream_functions(
    num_streams, add_stream_embed=False, add_attn_pool_reduce_stream=False, dim=None, disable=False
):
    if disable:
        return (nn.Identity(), nn.Identity())
    if add_stream_embed or add_attn_pool_reduce_stream:
        assert dim is not None, (
            "`dim` must be passed into get_init_and_expand_reduce_stream_functions for returning an expansion "
            "function with stream embeddings added"
        )
    if add_stream_embed:
        expand_fn = StreamEmbed(num_streams, dim, expand_to_streams=True)
    else:
        expand_fn = ExpandStreams(num_streams)
    reduce_fn = AttentionPoolReduceStream(dim) if add_attn_pool_reduce_stream else ReduceStreams()
    return expand_fn, reduce_fn


def get_init_and_expand_reduce_stream_functions(
    num_streams,
    num_fracs=1,
    dim=None,
    add_stream_embed=False,
    add_attn_pool_reduce_stream=False,
    disable=None,
    sinkhorn_iters=20,
    use_triton_sinkhorn=False,
    **kwargs,
):
    disable = (num_streams == 1 and num_fracs == 1) if disable is None else disable
    klass = Residual if disable else ManifoldConstrainedHyperConnections
    init_fn = partial(klass, num_streams, num_fracs=num_fracs, sinkhorn_iters=sinkhorn_iters,
                      use_triton_sinkhorn=use_triton_sinkhorn, **kwargs)
    expand_reduce = get_expand_reduce_stream_functions(
        num_streams, add_stream_embed=add_stream_embed, add_attn_pool_reduce_stream=add_attn_pool_reduce_stream,
        dim=dim, disable=disable,
    )
    if dim is not None:
        init_fn = partial(init_fn, dim=dim)
    return (init_fn, *expand_reduce)


# ---------------------------------------------------------------------------------------
# mHC v2


class ManifoldConstrainedHyperConnections(_BranchMixin, Module):
    def __init__(
        self,
        num_residual_streams,
        *,
        dim,
        branch: Optional[Module] = None,
        layer_index=None,
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
        use_triton_sinkhorn=False,
        mix_streams_before_norm=False,
    ):
        super().__init__()
        _check_common(_NAME, dim, num_residual_streams, num_fracs, False, num_input_views, depth_residual_fn)
        n = num_residual_streams
        self.branch = branch
        self.num_fracs, self.has_fracs = num_fracs, False

        # As the original (same torch RNG draws: Conv2d's init, then Dirac).
        self.maybe_mix_streams = None
        if mix_streams_before_norm:
            self.maybe_mix_streams = nn.Conv2d(n, n, 1, bias=False)
            nn.init.dirac_(self.maybe_mix_streams.weight)

        self.norm = RMSNorm(dim)
        self.num_residual_streams = n
        fallback = randrange(n)  # drawn unconditionally, as the original
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
            self.static_beta = nn.Parameter(torch.ones(n, num_fracs, 1))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim, num_fracs))
            self.h_post_scale = nn.Parameter(torch.ones(()) * 1e-2)

        self.sinkhorn_iters, self.log_domain_sinkhorn = sinkhorn_iters, log_domain_sinkhorn
        self.use_triton_sinkhorn = use_triton_sinkhorn
        self.residual_mix_constraint_fn = None if use_triton_sinkhorn else residual_mix_constraint_fn

        self.dropout = nn.Dropout(dropout)
        self.residual_transform = nn.Identity() if residual_transform is None else residual_transform
        self.depth_residual_fn = depth_residual_fn

        self.forward_method_names = forward_method_names
        for name in forward_method_names:
            assert not hasattr(self, name)
            setattr(self, name, getattr(self.branch, name))

    def _constrain_residual(self, logits_src_dst: Tensor) -> Tensor:
        """Their constraint on ``[src, dst]`` logits, returned as hcext's ``h_res[dst, src]``."""
        if self.residual_mix_constraint_fn is not None:
            m = self.residual_mix_constraint_fn(logits_src_dst)
        else:
            m = sinkhorn_knopps(logits_src_dst, self.sinkhorn_iters)
        return m.mT

    def _norm_input(self, x: Tensor) -> Tensor:
        """The streams the norm sees: ``x``, or ``W x`` with the 1x1 conv's ``W[dst, src]``."""
        if self.maybe_mix_streams is None:
            return x
        n, c = self.num_residual_streams, _compute_dtype(x.dtype)
        w = self.maybe_mix_streams.weight.reshape(n, n).to(c)
        zero_branch = x.new_zeros(()).expand(*x.shape[:-2], x.shape[-1])
        return ops.stream_mix_expand(zero_branch, x, w.new_zeros(n), w)

    def coefficients(self, x: Tensor):
        """``(h_pre, h_post, h_res[dst, src])`` for streams ``x [..., s, d]``."""
        beta = None
        if self.add_branch_out_to_residual:
            beta = (self.static_beta.reshape(self.num_residual_streams), self.dynamic_beta_fn.reshape(-1))
        return _mhc_coefficients(self, self._norm_input(x), beta)

    def _streams(self, residuals: Tensor) -> Tensor:
        x = self.residual_transform(residuals)
        if x.dim() < 2 or x.shape[-2] != self.num_residual_streams:
            raise ValueError(
                f"hcext.compat.{_NAME}: expected residuals of shape [..., {self.num_residual_streams}, d] "
                f"(streams at dim -2: expand the input with the expand function first), got {list(x.shape)}"
            )
        return x

    # The package's public methods: streams [..., s, d] in and out, the residuals' dtype.

    def width_connection(self, residuals):
        """``(branch_input [..., d], H_res-mixed residuals [..., s, d], dict(beta=[..., s, 1, 1] or
        None))`` for ``residuals [..., s, d]`` (after ``residual_transform``), in their dtype."""
        x = self._streams(residuals)
        h_pre, h_post, h_res = self.coefficients(x)
        branch_input, mixed, beta = _width_outputs(x, h_pre, h_post, h_res)
        return branch_input, mixed, dict(beta=None if beta is None else beta[..., None, None])

    def depth_connection(self, branch_output, residuals, *, beta):
        """``residuals + beta * branch_output`` (``[..., s, d]``, the residuals' dtype), then dropout."""
        assert self.add_branch_out_to_residual
        if beta is None or beta.dim() < 3 or beta.shape[-1] != 1 or beta.shape[-2] != 1:
            raise ValueError(
                f"hcext.compat.{_NAME}.depth_connection: expected beta of shape [..., s, 1, 1] (as width_connection "
                f"returns it), got {None if beta is None else list(beta.shape)}"
            )
        return self.dropout(_depth_output(branch_output, residuals, beta[..., 0, 0]))

    # The fused path of forward: the mix is deferred to after the branch.

    def _fused_width_connection(self, residuals):
        x = self._streams(residuals)
        h_pre, h_post, h_res = self.coefficients(x)
        branch_input = ops.stream_aggregate(x, h_pre.contiguous())
        return branch_input, x, dict(h_post=h_post, h_res=h_res)

    def _fused_depth_connection(self, branch_output, streams, *, h_post, h_res):
        out = ops.stream_mix_expand(branch_output.to(streams.dtype), streams, h_post, h_res)
        return self.dropout(out)


ManifoldConstrainedHyperConnections._fused_base = ManifoldConstrainedHyperConnections
mHC = ManifoldConstrainedHyperConnections
ManifoldConstrainedHyperConnections.get_expand_reduce_stream_functions = staticmethod(get_expand_reduce_stream_functions)
ManifoldConstrainedHyperConnections.get_init_and_expand_reduce_stream_functions = staticmethod(
    get_init_and_expand_reduce_stream_functions
)


# ---------------------------------------------------------------------------------------
# stream embedding and attention-pool reduction in mHCv2's layout (plain PyTorch)


class StreamEmbed(Module):
    """Adds a learned embedding per stream (``stream_embed [s, d]``) to ``[..., s, d]``,
    optionally expanding ``[..., d]`` to the streams first."""

    def __init__(self, num_streams, dim, expand_to_streams=False):
        super().__init__()
        self.num_streams = num_streams
        self.expand_to_streams = expand_to_streams
        self.stream_embed = nn.Parameter(torch.zeros(num_streams, dim))

    def forward(self, residuals):
        if self.expand_to_streams:
            residuals = residuals.unsqueeze(-2)  # broadcasts against the [s, d] embedding
        return residuals + self.stream_embed


class AttentionPoolReduceStream(Module):
    """``[..., s, d] -> [..., d]`` with a per-channel softmax over the streams
    (``to_attn_logits``, identity init)."""

    def __init__(self, dim):
        super().__init__()
        self.to_attn_logits = nn.Linear(dim, dim, bias=False)
        self.to_attn_logits.weight.data.copy_(torch.eye(dim))

    def forward(self, residuals):
        attn = self.to_attn_logits(residuals).softmax(dim=-2)
        return (residuals * attn).sum(-2)
