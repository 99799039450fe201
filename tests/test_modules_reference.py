"""hcext's modules against hcext/reference.py, in the style of tests/test_nn_reference.py:
perturbed parameters, every constructor argument at a non-default value (distinct values, so
that a swap shows), forward and every gradient (input and every parameter) in fp64 within
the table's fp64 row (helpers.assert_scaled_close).

* hcext.nn.HyperConnectionStack: kinds mhc, hc, hc_static, a mix of the three, and the
  shifted collapse; fused boundaries on and off; recompute off, blocks of 2 (with save_ops) and
  "auto" (with a custom policy); extra forward arguments passed to every branch. The
  reference is the plain loop of reference.mhc_pre / hc_coeffs + stream_aggregate /
  mhc_pre_shifted and stream_mix_expand over the same branches.
* hcext.nn.StreamHead: DeepSeek's mhc_head formula written out.
* hcext.compat: hyper_connections.HyperConnections and ManifoldConstrainedHyperConnections
  (mHC) and mHCv2.ManifoldConstrainedHyperConnections, in both calling conventions, with the
  package's formulas on reference.hc_coeffs / reference.sinkhorn / stream_aggregate /
  stream_mix_expand (their RMSNorm is F.normalize * sqrt(d) * (gamma + 1): reference rms norm
  with weight gamma + 1 and eps 0; their Sinkhorn is reference.sinkhorn with eps 0 on the
  [src, dst] logits; their log-domain Sinkhorn written out), dropout in training mode with the
  same seed.
"""

from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy

from hcext import reference as ref
from hcext.compat import hyper_connections as compat
from hcext.compat import mHCv2 as compat_v2
from hcext.nn import HyperConnection, HyperConnectionStack, StreamHead
from helpers import assert_scaled_close

F64 = torch.float64
N, C = 4, 8


def _perturb(module: nn.Module, seed: int = 0, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _weights(outs: Sequence[torch.Tensor], seed: int = 1) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]


def _forward_backward(fn, inputs: Sequence[torch.Tensor], seed: Optional[int] = None):
    """outs = fn() (a tensor or a tuple of them), then the gradients of sum_k sum(w_k * out_k)
    with respect to ``inputs`` (None where unused). ``seed``: torch.manual_seed first (dropout)."""
    if seed is not None:
        torch.manual_seed(seed)
    outs = fn()
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    loss = sum((o * w).sum() for o, w in zip(outs, _weights(outs)))
    grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def _compare(got, want, names: Sequence[str]):
    (outs, grads), (ref_outs, ref_grads) = got, want
    assert len(outs) == len(ref_outs)
    for k, (a, b) in enumerate(zip(outs, ref_outs)):
        assert_scaled_close(a, b, F64, name=f"output {k}")
    for name, a, b in zip(names, grads, ref_grads):
        assert (a is None) == (b is None), f"gradient of {name}: {a is None} vs the reference's {b is None}"
        if a is not None:
            assert_scaled_close(a, b, F64, name=f"gradient of {name}")
    # Every parameter that the reference uses gets a gradient (none silently cut off).
    assert all(g is not None for g in ref_grads), [n for n, g in zip(names, ref_grads) if g is None]


class Branch(nn.Module):
    """A sub-layer with parameters and an extra forward argument: ``lin(tanh(norm(y))) * scale``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, y, scale=1.0):
        return self.lin(torch.tanh(self.norm(y))) * scale

    def describe(self) -> str:
        return "branch"


# ---------------------------------------------------------------------------------------
# HyperConnectionStack

HC_KWARGS = dict(sinkhorn_iters=7, norm_eps=1e-3, sinkhorn_eps=3e-2, pre_eps=0.1, post_mult=1.5, alpha_init=0.3,
                 norm="layer", use_tanh=False)
KINDS = {
    "mhc": ["mhc"] * 4,
    "hc": ["hc"] * 3,
    "hc_static": ["hc_static"] * 3,
    "mixed": ["mhc", "mhc", "hc", "mhc", "hc_static", "mhc"],  # fused boundaries only between mhc layers
    "shifted": ["mhc"] * 4,
}
RECOMPUTE = {
    "off": dict(recompute_block=None),
    "block2-save_ops": dict(recompute_block=2, save_ops=(torch.ops.aten.addmm,)),
    "auto-policy": dict(recompute_block="auto",
                        policy=lambda ctx, func, *args, **kwargs: CheckpointPolicy.PREFER_RECOMPUTE),
}


def _layer_reference(layer: HyperConnection, x, scale):
    """One sub-layer on hcext.reference (collapse "pre")."""
    p = dict(layer.named_parameters(recurse=False))
    if layer.kind == "mhc":
        y, h_post, h_res = ref.mhc_pre(x, p["phi"], p["alpha"], p["bias"], layer.sinkhorn_iters, layer.norm_eps,
                                       layer.sinkhorn_eps, layer.pre_eps, layer.post_mult)
    else:
        h_pre, h_post, h_res = ref.hc_coeffs(
            x, p["static_alpha"], p["static_beta"], p.get("dynamic_alpha"), p.get("dynamic_beta"),
            p.get("alpha_scale"), p.get("beta_scale"), p.get("norm_weight"), None, layer.norm, layer.norm_eps,
            layer.use_tanh)
        y = ref.stream_aggregate(x, h_pre)
    return ref.stream_mix_expand(layer.branch(y, scale), x, h_post, h_res)


def _stack_reference(stack: HyperConnectionStack, x, scale):
    if stack.collapse != "shifted":
        for layer in stack.layers:
            x = _layer_reference(layer, x, scale)
        return x
    pre = ref.shifted_initial_pre_mix(x.shape[-2], x.dtype)
    for layer in stack.layers:
        y, h_post, h_res, pre = ref.mhc_pre_shifted(
            x, pre, layer.phi, layer.alpha, layer.bias, layer.sinkhorn_iters, layer.norm_eps, layer.sinkhorn_eps,
            layer.pre_eps, layer.post_mult)
        x = ref.stream_mix_expand(layer.branch(y, scale), x, h_post, h_res)
    return x, pre


def _stack(kind: str, fuse: bool, recompute: str) -> HyperConnectionStack:
    torch.manual_seed(0)
    collapse = "shifted" if kind == "shifted" else "pre"
    layers = [HyperConnection(C, N, kind=k, branch=Branch(C), layer_index=i + 1, collapse=collapse, **HC_KWARGS)
              for i, k in enumerate(KINDS[kind])]
    stack = HyperConnectionStack(layers, fuse_boundaries=fuse, collapse=collapse if kind == "shifted" else None,
                                 **RECOMPUTE[recompute]).double()
    _perturb(stack)
    return stack.train()


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_stack_against_reference(kind, fuse, recompute):
    stack = _stack(kind, fuse, recompute)
    assert stack.recomputing() == (recompute != "off")
    x = torch.randn(2, 3, N, C, dtype=F64, requires_grad=True)
    params = dict(stack.named_parameters())
    inputs = [x, *params.values()]
    got = _forward_backward(lambda: stack(x, 0.7), inputs)
    want = _forward_backward(lambda: _stack_reference(stack, x, 0.7), inputs)
    _compare(got, want, ["x", *params])


def test_stack_from_branches_every_argument():
    """from_branches with every argument given: the same numbers as the stack built by hand."""
    torch.manual_seed(0)
    branches = [Branch(C) for _ in range(4)]
    stack = HyperConnectionStack.from_branches(
        branches, C, N, kind="mhc", recompute_block=3, save_ops=(torch.ops.aten.mm, torch.ops.aten.addmm),
        fuse_boundaries=False, collapse="pre", **HC_KWARGS).double()
    assert [layer.layer_index for layer in stack.layers] == [0, 1, 2, 3] and stack.block_size == 3
    for layer in stack.layers:
        assert (layer.sinkhorn_iters, layer.norm_eps, layer.sinkhorn_eps, layer.pre_eps, layer.post_mult) == (
            7, 1e-3, 3e-2, 0.1, 1.5)
        assert torch.equal(layer.alpha.detach(), torch.full((3,), 0.3).double())  # alpha_init (fp32, cast)
    _perturb(stack, seed=5)
    x = torch.randn(5, N, C, dtype=F64, requires_grad=True)
    params = dict(stack.named_parameters())
    inputs = [x, *params.values()]
    got = _forward_backward(lambda: stack(x, scale=1.3), inputs)
    want = _forward_backward(lambda: _stack_reference(stack, x, 1.3), inputs)
    _compare(got, want, ["x", *params])


# ---------------------------------------------------------------------------------------
# StreamHead


def test_stream_head_against_reference():
    head = StreamHead(C, N, norm_eps=1e-3, eps=0.05).double()
    _perturb(head)
    x = torch.randn(2, 3, N, C, dtype=F64, requires_grad=True)

    def reference():
        xf = x.flatten(-2)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-3)
        w = torch.sigmoid(head.scale * (xf @ head.fn) * r + head.base) + 0.05
        return ref.stream_aggregate(x, w)

    params = dict(head.named_parameters())
    inputs = [x, *params.values()]
    _compare(_forward_backward(lambda: head(x), inputs), _forward_backward(reference, inputs), ["x", *params])


def test_stream_head_initialised_to_the_mean():
    x = torch.randn(3, N, C, dtype=F64)
    torch.testing.assert_close(StreamHead(C, N).double()(x), x.mean(-2), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# hcext.compat: the package's formulas on hcext.reference


def _unfold(residuals, s):
    """``(b s) ... d -> b ... s d``."""
    return residuals.unflatten(0, (-1, s)).movedim(1, -2)


def _fold(x):
    return x.movedim(-2, 1).flatten(0, 1)


def _their_rms(x, gamma):
    """The package's RMSNorm: F.normalize(x, dim=-1) * sqrt(d) * (gamma + 1)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * (gamma + 1)


def _their_sinkhorn(logits, iters, log_domain):
    """The package's Sinkhorn on [src, dst] logits: exp(l - max over dim -2), then iters times
    L1-normalise dim -2 and dim -1 (reference.sinkhorn with eps 0: its softmax is the first
    step), or the same in the log domain."""
    if log_domain:
        for _ in range(iters):
            logits = F.log_softmax(logits, dim=-2)
            logits = F.log_softmax(logits, dim=-1)
        return logits.exp()
    return ref.sinkhorn(logits, iters, 0.0)


def _hc_reference(m: compat.HyperConnections, residuals, branch):
    x = _unfold(residuals, m.num_residual_streams)
    add = m.add_branch_out_to_residual
    ones = torch.ones(m.num_residual_streams, dtype=x.dtype)
    h_pre, h_post, h_res = ref.hc_coeffs(
        x, m.static_alpha, m.static_beta if add else ones, m.dynamic_alpha_fn, m.dynamic_beta_fn if add else None,
        m.dynamic_alpha_scale, m.dynamic_beta_scale if add else None, m.norm.gamma + 1, None, "rms", 0.0, m.tanh)
    out = branch(ref.stream_aggregate(x, h_pre))
    if not add:
        return out
    return F.dropout(_fold(ref.stream_mix_expand(out, x, h_post, h_res)), m.dropout.p, m.training)


def _mhc_coefficients_reference(m, x, norm_input, static_beta, dynamic_beta, constraint):
    """The package's mHC coefficients (h_pre, h_post or None, h_res[dst, src])."""
    s = m.num_residual_streams
    normed = _their_rms(norm_input, m.norm.gamma)
    scale = torch.cat([m.pre_branch_scale, m.residual_scale.expand(s)])
    pres, ress = [], []
    for p in range(m.dynamic_alpha_fn.shape[0]):
        alpha = (normed @ m.dynamic_alpha_fn[p]) * scale + m.static_alpha  # [..., s(src), 1 + s(dst)]
        pres.append(torch.sigmoid(alpha[..., 0]))
        ress.append(constraint(alpha[..., 1:]))
    h_pre = torch.stack(pres).mean(0)
    h_res = torch.stack(ress).mean(0).mT  # [src, dst] -> hcext's [dst, src]
    h_post = None
    if m.add_branch_out_to_residual:
        h_post = 2 * torch.sigmoid(static_beta + m.h_post_scale * (normed @ dynamic_beta))
    return h_pre, h_post, h_res


def _mhc_reference(m: compat.ManifoldConstrainedHyperConnections, residuals, branch):
    residuals = m.residual_transform(residuals)
    x = _unfold(residuals, m.num_residual_streams)
    if m.residual_mix_constraint_fn is not None:
        constraint = m.residual_mix_constraint_fn
    else:
        constraint = lambda l: _their_sinkhorn(l, m.sinkhorn_iters, m.log_domain_sinkhorn)  # noqa: E731
    beta = (m.static_beta, m.dynamic_beta_fn) if m.add_branch_out_to_residual else (None, None)
    h_pre, h_post, h_res = _mhc_coefficients_reference(m, x, x, *beta, constraint)
    out = branch(ref.stream_aggregate(x, h_pre))
    if h_post is None:
        return out
    return F.dropout(_fold(ref.stream_mix_expand(out, x, h_post, h_res)), m.dropout.p, m.training)


def _mhc_v2_reference(m: compat_v2.ManifoldConstrainedHyperConnections, residuals, branch):
    x = m.residual_transform(residuals)  # [..., s, d]: the streams as they are
    s = m.num_residual_streams
    norm_input = x
    if m.maybe_mix_streams is not None:  # a 1x1 conv over the streams, W[dst, src]
        norm_input = torch.einsum("ts,...sd->...td", m.maybe_mix_streams.weight.reshape(s, s), x)
    if m.use_triton_sinkhorn:  # their Triton kernel: the log-domain Sinkhorn, before a user constraint
        constraint = lambda l: _their_sinkhorn(l, m.sinkhorn_iters, True)  # noqa: E731
    elif m.residual_mix_constraint_fn is not None:
        constraint = m.residual_mix_constraint_fn
    elif m.sinkhorn_iters <= 0:
        constraint = lambda l: l  # noqa: E731  (no constraint: the raw logits)
    else:
        constraint = lambda l: _their_sinkhorn(l, m.sinkhorn_iters, m.log_domain_sinkhorn)  # noqa: E731
    beta = ((m.static_beta.reshape(s), m.dynamic_beta_fn.reshape(-1)) if m.add_branch_out_to_residual
            else (None, None))
    h_pre, h_post, h_res = _mhc_coefficients_reference(m, x, norm_input, *beta, constraint)
    out = branch(ref.stream_aggregate(x, h_pre))
    if h_post is None:
        return out
    return F.dropout(ref.stream_mix_expand(out, x, h_post, h_res), m.dropout.p, m.training)


def _softmax_dst(logits):  # a user constraint: each source's weights sum to 1
    return logits.softmax(dim=-1)


COMPAT_CASES = {
    # (class, constructor arguments (branch: True = a Branch module), reference, input layout)
    "hc-every-argument": (compat.HyperConnections, dict(
        branch=True, layer_index=2, tanh=False, dropout=0.25, add_branch_out_to_residual=True,
        depth_residual_fn=operator.add, num_input_views=1, num_fracs=1, channel_first=False), _hc_reference, "folded"),
    "hc-no-branch-out": (compat.HyperConnections, dict(
        branch=None, layer_index=3, tanh=True, add_branch_out_to_residual=False), _hc_reference, "folded"),
    "mhc-every-argument": (compat.ManifoldConstrainedHyperConnections, dict(
        branch=True, layer_index=1, dropout=0.25, residual_transform=True, depth_residual_fn=operator.add,
        sinkhorn_iters=7, log_domain_sinkhorn=True, forward_method_names=("describe",),
        num_dynamic_alpha_proposals=3), _mhc_reference, "folded"),
    "mhc-direct-sinkhorn": (compat.ManifoldConstrainedHyperConnections, dict(
        branch=None, layer_index=0, sinkhorn_iters=5, num_dynamic_alpha_proposals=2), _mhc_reference, "folded"),
    "mhc-custom-constraint": (compat.ManifoldConstrainedHyperConnections, dict(
        branch=True, layer_index=2, residual_mix_constraint_fn=_softmax_dst, add_branch_out_to_residual=False,
        num_dynamic_alpha_proposals=2), _mhc_reference, "folded"),
    "mhcv2-every-argument": (compat_v2.ManifoldConstrainedHyperConnections, dict(
        branch=True, layer_index=3, dropout=0.25, residual_transform=True, depth_residual_fn=operator.add,
        sinkhorn_iters=6, log_domain_sinkhorn=True, residual_mix_constraint_fn=_softmax_dst,
        forward_method_names=("describe",), num_dynamic_alpha_proposals=2, use_triton_sinkhorn=True,
        mix_streams_before_norm=True), _mhc_v2_reference, "streams"),
    "mhcv2-custom-constraint": (compat_v2.ManifoldConstrainedHyperConnections, dict(
        branch=None, layer_index=1, residual_mix_constraint_fn=_softmax_dst, sinkhorn_iters=3,
        num_dynamic_alpha_proposals=3, mix_streams_before_norm=True), _mhc_v2_reference, "streams"),
    "mhcv2-no-constraint": (compat_v2.ManifoldConstrainedHyperConnections, dict(
        branch=True, layer_index=2, sinkhorn_iters=0, add_branch_out_to_residual=False), _mhc_v2_reference,
        "streams"),
}


@pytest.mark.parametrize("case", list(COMPAT_CASES))
def test_compat_against_reference(case):
    cls, kwargs, reference, layout = COMPAT_CASES[case]
    kwargs = dict(kwargs)
    torch.manual_seed(0)
    branch = Branch(C) if kwargs.pop("branch") else None
    if kwargs.get("residual_transform"):
        kwargs["residual_transform"] = nn.Linear(C, C)
    module = cls(N, dim=C, branch=branch, **kwargs).double()
    _perturb(module)
    module.train()
    if kwargs.get("forward_method_names"):
        assert module.describe() == "branch"
    if layout == "folded":
        residuals = torch.randn(2 * N, 3, C, dtype=F64, requires_grad=True)  # (b s) t d
    else:
        residuals = torch.randn(2, 3, N, C, dtype=F64, requires_grad=True)  # b t s d
    lin = nn.Linear(C, C).double()  # the branch of the (branch_input, add_residual) convention

    def call():
        if branch is not None:
            return module(residuals, 0.7)  # extra arguments go to the branch
        branch_input, add_residual = module(residuals)
        return add_residual(torch.tanh(lin(branch_input)))

    def call_reference():
        fn = (lambda y: branch(y, 0.7)) if branch is not None else (lambda y: torch.tanh(lin(y)))
        return reference(module, residuals, fn)

    params = dict(module.named_parameters())
    if branch is None:
        params.update({f"lin.{k}": v for k, v in lin.named_parameters()})
    inputs = [residuals, *params.values()]
    got = _forward_backward(call, inputs, seed=11)
    want = _forward_backward(call_reference, inputs, seed=11)
    if module.dropout.p > 0:  # the same dropout mask in both: something was dropped
        assert (got[0][0] == 0).any()
    _compare(got, want, ["residuals", *params])
