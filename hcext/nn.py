"""Thin modules over hcext's ops: parameters plus one op call each.

    streams = expand_streams(embedding, n)                 # [..., C] -> [..., n, C]
    for block in blocks:                                   # every attention / MLP sub-layer
        streams = block.hc(streams)                        # HyperConnection(dim, n, branch=...)
    hidden = reduce_streams(streams)                       # or StreamHead(dim, n)(streams)

A :class:`HyperConnection` with a ``branch`` maps streams to streams. Without one,
``hc(x)`` returns ``(branch_input, add_branch_output)`` so that any block can be wrapped
(attention with extra arguments, MoE returning auxiliary losses)::

    branch_input, add = hc(streams)
    out, aux_loss = moe(branch_input)
    streams = add(out)
"""

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import init as hc_init
from . import ops

__all__ = ["HyperConnection", "StreamHead", "expand_streams", "reduce_streams"]


def expand_streams(x: Tensor, num_streams: int) -> Tensor:
    """Network input (HC §2.3): copy the hidden state ``[..., C]`` into n streams ``[..., n, C]``."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], num_streams, x.shape[-1]).contiguous()


def reduce_streams(x: Tensor) -> Tensor:
    """Network output (HC §2.3): the sum of the streams ``[..., n, C] -> [..., C]``.

    With copied-in streams and Pre-Norm-equivalent initialisation every stream carries the
    same hidden state, so the sum is n times the Pre-Norm hidden state: the final norm
    (RMSNorm/LayerNorm before the unembedding) removes that factor.
    """
    return x.sum(-2)


def mhc_bias_init(num_streams: int, pre_eps: float = 1e-6) -> Tensor:
    """The mHC bias at which the layer equals a Pre-Norm residual layer (with phi = 0).

    mHC's paper leaves b unspecified (spec.md §B "Derived"). hcext chooses, for copied-in
    (equal) streams: ``h_pre = 1/n`` (so the layer input equals the hidden state, not n/2
    times it), ``h_post = 2σ(0) = 1`` (the branch output is added once to every stream),
    ``b_res = 0`` (uniform, doubly stochastic ``H_res``: equal streams stay equal).
    """
    n = num_streams
    p = 1.0 / n - pre_eps
    b_pre = math.log(p / (1.0 - p)) if n > 1 else 20.0  # n = 1: σ(20) ≈ 1
    return torch.cat([torch.full((n,), b_pre), torch.zeros(n), torch.zeros(n * n)])


class HyperConnection(nn.Module):
    """One sub-layer's hyper-connection: ``x' = H_res x + h_post ⊗ branch(Σ_i h_pre[i] x_i)``.

    Args:
        dim: C, the width of each stream.
        num_streams: n (the papers' expansion rate; 4 is their default).
        kind: ``"mhc"`` (DeepSeek's manifold-constrained HC: dynamic coefficients from the
            flattened normed streams, Sinkhorn-projected H_res), ``"hc"`` (the original
            dynamic Hyper-Connections, tanh) or ``"hc_static"`` (static HC: learned
            coefficients shared by every token).
        branch: the wrapped sub-layer ``[..., C] -> [..., C]`` (it should contain its own
            Pre-Norm). Without it, ``forward`` returns ``(branch_input, add_branch_output)``.
        layer_index: the sub-layer's index (used by the HC initialisation).
        sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult: mHC, see
            :func:`hcext.ops.mhc_coeffs` (paper defaults: 20 iterations, 2σ).
        norm, use_tanh, norm_eps: HC, see :func:`hcext.ops.hc_coeffs` (paper default: tanh;
            ``use_tanh=False`` is the paper's best-scoring "w/o tanh" ablation).

    Initialisation: at init the network equals a Pre-Norm network (up to the 1e-6
    epsilons). mHC: ``phi = 0``, ``alpha = 0.01`` (the paper's), bias from
    :func:`mhc_bias_init`. HC (paper Alg. 2, :mod:`hcext.init`): ``B = 1``,
    ``A_m = e_{layer_index mod n}``, ``A_r = I``, dynamic weights 0, scales 0.01. The
    coefficient parameters are kept in fp32 whatever the module's dtype (they are cast to
    fp32 in ``forward`` if a user casts the model). Static HC parameters should get no
    weight decay (HC §3); dynamic ones do.
    """

    def __init__(
        self,
        dim: int,
        num_streams: int = 4,
        *,
        kind: str = "mhc",
        branch: Optional[nn.Module] = None,
        layer_index: int = 0,
        sinkhorn_iters: int = 20,
        norm_eps: float = 1e-6,
        sinkhorn_eps: float = 1e-6,
        pre_eps: float = 1e-6,
        post_mult: float = 2.0,
        alpha_init: float = 0.01,
        norm: str = "rms",
        use_tanh: bool = True,
    ):
        super().__init__()
        if kind not in ("mhc", "hc", "hc_static"):
            raise ValueError(f"HyperConnection: kind must be 'mhc', 'hc' or 'hc_static', got {kind!r}")
        if norm not in ("rms", "layer"):
            raise ValueError(f"HyperConnection: norm must be 'rms' or 'layer', got {norm!r}")
        if not 1 <= num_streams <= 32:
            raise ValueError(f"HyperConnection: num_streams must be in [1, 32], got {num_streams}")
        self.dim, self.num_streams, self.kind, self.layer_index = dim, num_streams, kind, layer_index
        self.branch = branch
        self.sinkhorn_iters, self.norm_eps, self.sinkhorn_eps = sinkhorn_iters, norm_eps, sinkhorn_eps
        self.pre_eps, self.post_mult = pre_eps, post_mult
        self.norm, self.use_tanh = norm, use_tanh
        n = num_streams
        if kind == "mhc":
            self.phi = nn.Parameter(torch.zeros(n * dim, n * n + 2 * n))
            self.alpha = nn.Parameter(torch.full((3,), float(alpha_init)))
            self.bias = nn.Parameter(mhc_bias_init(n, pre_eps))
        else:
            params = hc_init.hc_dynamic(n, dim, layer_index) if kind == "hc" else hc_init.hc_static(n, layer_index)
            for name, value in params.items():
                setattr(self, name, nn.Parameter(value))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_streams={self.num_streams}, kind={self.kind!r}, sinkhorn_iters={self.sinkhorn_iters}"

    def prepare(self, x: Tensor) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``x [..., n, C] -> (branch_input [..., C], add_branch_output)``."""
        if x.dim() < 2 or x.shape[-2] != self.num_streams or x.shape[-1] != self.dim:
            raise ValueError(
                f"HyperConnection: expected streams of shape [..., {self.num_streams}, {self.dim}], got {tuple(x.shape)}"
            )
        if self.kind == "mhc":
            p = self._coefficient_params(x)
            branch_input, h_post, h_res = ops.mhc_pre(
                x, p["phi"], p["alpha"], p["bias"], self.sinkhorn_iters,
                self.norm_eps, self.sinkhorn_eps, self.pre_eps, self.post_mult,
            )
        else:
            h_pre, h_post, h_res = self.coefficients(x)
            branch_input = ops.stream_aggregate(x, h_pre)

        def add_branch_output(f: Tensor) -> Tensor:
            return ops.stream_mix_expand(f.to(x.dtype), x, h_post, h_res)

        return branch_input, add_branch_output

    def _coefficient_params(self, x: Tensor) -> dict:
        """The coefficient parameters in the ops' compute dtype: fp32, or fp64 for fp64
        streams (whatever dtype the module was cast to; the cast is differentiable)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return {name: p.to(dtype) for name, p in self.named_parameters(recurse=False)}

    def coefficients(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(h_pre, h_post, h_res)`` for streams x (fp32), e.g. to inspect the mixing matrices."""
        p = self._coefficient_params(x)
        if self.kind == "mhc":
            return ops.mhc_coeffs(
                x, p["phi"], p["alpha"], p["bias"], self.sinkhorn_iters,
                self.norm_eps, self.sinkhorn_eps, self.pre_eps, self.post_mult,
            )
        return ops.hc_coeffs(
            x, p["static_alpha"], p["static_beta"], p.get("dynamic_alpha"), p.get("dynamic_beta"),
            p.get("alpha_scale"), p.get("beta_scale"), p.get("norm_weight"), None, self.norm, self.norm_eps,
            self.use_tanh,
        )

    def forward(self, x: Tensor, *args, **kwargs):
        branch_input, add = self.prepare(x)
        if self.branch is None:
            return branch_input, add
        out = self.branch(branch_input, *args, **kwargs)
        if isinstance(out, tuple):  # (output, *extras), e.g. an MoE's auxiliary loss
            return (add(out[0]), *out[1:])
        return add(out)


class StreamHead(nn.Module):
    """DeepSeek's learned output reduction of the streams (spec.md §C.10, ``mhc_head``):
    ``out = Σ_i w_i x_i`` with ``w = σ(scale · (x̃ @ fn) · rsqrt(mean(x̃²) + eps) + base) + eps``
    computed from the flattened streams ``x̃ [..., n*C]``; then apply the final norm.

    Initialised (fn = 0, base = logit(1/n)) to the mean of the streams.
    """

    def __init__(self, dim: int, num_streams: int = 4, *, norm_eps: float = 1e-6, eps: float = 1e-6):
        super().__init__()
        n = num_streams
        self.dim, self.num_streams, self.norm_eps, self.eps = dim, n, norm_eps, eps
        self.fn = nn.Parameter(torch.zeros(n * dim, n))
        self.scale = nn.Parameter(torch.ones(()))
        p = 1.0 / n - eps
        self.base = nn.Parameter(torch.full((n,), math.log(p / (1 - p)) if n > 1 else 20.0))

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # the ops' compute dtype
        xf = x.to(dtype).flatten(-2)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        w = torch.sigmoid(self.scale.to(dtype) * (xf @ self.fn.to(dtype)) * rstd + self.base.to(dtype)) + self.eps
        return ops.stream_aggregate(x, w)
