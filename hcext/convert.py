"""Convert mHC parameters between DeepSeek's TileKernels format and :mod:`hcext.nn`.

TileKernels (``deepseek-ai/TileKernels``, ``tile_kernels/modeling/mhc/functional.py``) keeps
one sub-layer's mHC parameters as

* ``fn [n²+2n, n*C]``: the projection, one *row* per coefficient, rows split
  ``[pre n | post n | res n²]``; the res rows are ``comb[src, dst]`` row-major;
* ``scale [3]``: ``(α_pre, α_post, α_res)``;
* ``base [n²+2n]``: the biases, split like fn's rows (res block ``[src, dst]``);
* optionally ``norm_weight [n*C]``, the RMSNorm weight, multiplied into fn's columns
  (``fn * norm_weight``) before the projection.

and applies ``comb`` as ``out[dst] = Σ_src comb[src, dst] · x[src]``; its Sinkhorn starts with
a softmax over ``dst`` and ends normalising over ``src``.

hcext (:class:`hcext.nn.HyperConnection` with ``kind="mhc"``) keeps ``phi [n*C, n²+2n]``
(one *column* per coefficient, the norm weight folded in), ``alpha [3]`` and ``bias
[n²+2n]``, with the res block ``H_res[dst, src]`` row-major: the transpose of ``comb``. Its
Sinkhorn (softmax over ``dst`` first, rows of ``H_res`` last) is TileKernels' on the
transposed matrix, so ``H_res = combᵀ`` exactly, iteration by iteration. The conversion is
therefore ``phi = (fn * norm_weight)ᵀ`` with the res columns permuted ``[src, dst] ->
[dst, src]``, ``alpha = scale``, ``bias = base`` with the same permutation. Everything else
(pre/post order, the flattening ``x̃[m*C + c] = x[m, c]``, the reordered RMSNorm, σ + pre_eps,
post_mult · σ) is the same in both.

Hyper-parameters are not stored in TileKernels' tensors. TileKernels' ``mhc_pre`` defaults
to ``sinkhorn_repeat=10`` and ``post_mult_value=1.0``; the paper (and hcext's default) uses
20 iterations and 2σ. :func:`from_tilekernels` defaults to the paper's values: pass the ones
the checkpoint was trained with.

The output reduction (``mhc_head``: ``fn [n, n*C]``, ``scale [1]``, ``base [n]``) converts to
and from :class:`hcext.nn.StreamHead` with :func:`head_from_tilekernels` /
:func:`head_to_tilekernels`.
"""

import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .nn import HyperConnection, StreamHead

__all__ = [
    "from_tilekernels",
    "to_tilekernels",
    "tilekernels_config",
    "head_from_tilekernels",
    "head_to_tilekernels",
]


def _num_streams(width: int, what: str) -> int:
    # width = n² + 2n = (n + 1)² - 1
    n = math.isqrt(width + 1) - 1
    if n < 1 or n * n + 2 * n != width:
        raise ValueError(f"{what}: expected n*n + 2n coefficients (24 for n = 4), got {width}")
    return n


def _swap_res_block(t: Tensor, n: int, dim: int) -> Tensor:
    """Transposes the res block ``[src, dst] <-> [dst, src]`` along ``dim`` (its own inverse)."""
    t = t.movedim(dim, 0)
    res = t[2 * n :].unflatten(0, (n, n)).transpose(0, 1).flatten(0, 1)
    return torch.cat((t[: 2 * n], res), 0).movedim(0, dim)


@torch.no_grad()
def from_tilekernels(
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    norm_weight: Optional[Tensor] = None,
    *,
    module: Optional[HyperConnection] = None,
    branch: Optional[nn.Module] = None,
    layer_index: int = 0,
    sinkhorn_iters: int = 20,
    norm_eps: float = 1e-6,
    sinkhorn_eps: float = 1e-6,
    pre_eps: float = 1e-6,
    post_mult: float = 2.0,
) -> HyperConnection:
    """An ``HyperConnection(kind="mhc")`` with TileKernels' parameters (see the module docstring).

    ``fn [n²+2n, n*C]``, ``scale [3]``, ``base [n²+2n]``, optional ``norm_weight [n*C]``
    (folded into ``phi``; the result has no separate norm weight). n and C are inferred.
    With ``module`` the parameters are copied into that module (it must be an mHC
    ``HyperConnection`` of matching n and C; its hyper-parameters are kept) and it is
    returned; otherwise a new module is built with ``branch``, ``layer_index`` and the
    hyper-parameters given here (TileKernels' names: ``sinkhorn_repeat`` = sinkhorn_iters,
    ``post_mult_value`` = post_mult, ``mhc_pre_eps`` = pre_eps, ``rms_eps`` = norm_eps).
    Parameters are stored in fp32.
    """
    if fn.dim() != 2:
        raise ValueError(f"from_tilekernels: expected fn of shape [n*n+2n, n*C], got {tuple(fn.shape)}")
    n = _num_streams(fn.shape[0], "from_tilekernels: fn.shape[0]")
    if fn.shape[1] % n != 0:
        raise ValueError(f"from_tilekernels: expected fn.shape[1] = n*C with n = {n}, got {fn.shape[1]}")
    C = fn.shape[1] // n
    if tuple(scale.shape) != (3,):
        raise ValueError(f"from_tilekernels: expected scale of shape [3], got {tuple(scale.shape)}")
    if tuple(base.shape) != (fn.shape[0],):
        raise ValueError(f"from_tilekernels: expected base of shape [{fn.shape[0]}], got {tuple(base.shape)}")
    w = fn.float()
    if norm_weight is not None:
        if tuple(norm_weight.shape) != (n * C,):
            raise ValueError(f"from_tilekernels: expected norm_weight of shape [{n * C}], got {tuple(norm_weight.shape)}")
        w = w * norm_weight.float()  # TileKernels' fold: fn * norm_weight (per input column)
    phi = _swap_res_block(w, n, 0).t()
    bias = _swap_res_block(base.float(), n, 0)

    if module is None:
        module = HyperConnection(
            C, n, kind="mhc", branch=branch, layer_index=layer_index, sinkhorn_iters=sinkhorn_iters,
            norm_eps=norm_eps, sinkhorn_eps=sinkhorn_eps, pre_eps=pre_eps, post_mult=post_mult,
        ).to(fn.device)
    elif module.kind != "mhc" or module.num_streams != n or module.dim != C:
        raise ValueError(
            f"from_tilekernels: module must be an mHC HyperConnection with n = {n}, C = {C}, got "
            f"kind={module.kind!r}, n = {module.num_streams}, C = {module.dim}"
        )
    module.phi.copy_(phi)
    module.alpha.copy_(scale.float())
    module.bias.copy_(bias)
    return module


@torch.no_grad()
def to_tilekernels(module: HyperConnection, norm_weight: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """TileKernels' ``dict(fn, scale, base)`` (fp32) of an mHC ``HyperConnection``.

    hcext stores the norm weight folded into ``phi``; ``fn`` is that folded weight (use it
    with ``norm_weight=None`` in TileKernels). Given a ``norm_weight [n*C]`` (no zeros), the
    fold is undone instead: ``fn = foldedᵀ / norm_weight``, so that ``fn * norm_weight``
    reproduces it. Pass the result's tensors with :func:`tilekernels_config`'s keywords.
    """
    if module.kind != "mhc":
        raise ValueError(f"to_tilekernels: expected an mHC HyperConnection (kind='mhc'), got kind={module.kind!r}")
    n = module.num_streams
    fn = _swap_res_block(module.phi.float().t(), n, 0)
    if norm_weight is not None:
        if tuple(norm_weight.shape) != (fn.shape[1],):
            raise ValueError(f"to_tilekernels: expected norm_weight of shape [{fn.shape[1]}], got {tuple(norm_weight.shape)}")
        fn = fn / norm_weight.float()
    return dict(
        fn=fn.contiguous(),
        scale=module.alpha.float().clone(),
        base=_swap_res_block(module.bias.float(), n, 0).contiguous(),
    )


def tilekernels_config(module: HyperConnection) -> Dict[str, object]:
    """The keyword arguments of TileKernels' ``mhc_pre`` that reproduce ``module``'s hyper-parameters."""
    return dict(
        mhc_mult=module.num_streams,
        norm_eps=module.norm_eps,
        post_mult_value=module.post_mult,
        pre_eps=module.pre_eps,
        sinkhorn_eps=module.sinkhorn_eps,
        sinkhorn_repeat=module.sinkhorn_iters,
    )


@torch.no_grad()
def head_from_tilekernels(
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    norm_weight: Optional[Tensor] = None,
    *,
    norm_eps: float = 1e-6,
    pre_eps: float = 1e-6,
) -> StreamHead:
    """A :class:`hcext.nn.StreamHead` with the parameters of TileKernels' ``mhc_head``:
    ``fn [n, n*C]`` (or zero-padded to ``[n*n+2n, n*C]``), ``scale [1]`` or 0-dim,
    ``base [n]``, optional ``norm_weight [n*C]`` (folded in)."""
    n = base.shape[0]
    if fn.dim() != 2 or fn.shape[1] % n != 0 or fn.shape[0] < n:
        raise ValueError(f"head_from_tilekernels: expected fn of shape [n, n*C] with n = {n}, got {tuple(fn.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"head_from_tilekernels: expected a single scale, got shape {tuple(scale.shape)}")
    w = fn[:n].float()
    if norm_weight is not None:
        w = w * norm_weight.float()
    head = StreamHead(fn.shape[1] // n, n, norm_eps=norm_eps, eps=pre_eps).to(fn.device)
    head.fn.copy_(w.t())
    head.scale.copy_(scale.float().reshape(()))
    head.base.copy_(base.float())
    return head


@torch.no_grad()
def head_to_tilekernels(head: StreamHead) -> Dict[str, Tensor]:
    """TileKernels' ``mhc_head`` parameters ``dict(fn [n, n*C], scale [1], base [n])`` of a StreamHead."""
    return dict(
        fn=head.fn.float().t().contiguous(),
        scale=head.scale.float().reshape(1).clone(),
        base=head.base.float().clone(),
    )
