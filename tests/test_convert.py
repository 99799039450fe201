"""hcext.convert: TileKernels-format mHC parameters <-> hcext.nn modules.

The reference below is written in TileKernels' own convention (``fn [n²+2n, n*C]`` rows,
``comb[src, dst]`` applied as ``out[dst] = Σ_src comb[src, dst] · x[src]``, Sinkhorn starting
with a softmax over dst), independently of hcext's ``[dst, src]`` layout.
"""

import pytest
import torch
from torch import nn

from hcext import convert
from hcext.nn import HyperConnection, StreamHead
from helpers import TOLERANCES

TOL = TOLERANCES[torch.float32]  # the suite's one table (tests/helpers.py)


# ---------------------------------------------------------------------------------------
# TileKernels' convention, in plain PyTorch


def tk_sinkhorn(comb, iters, eps):
    """comb [..., src, dst]: softmax over dst, then alternately normalise src and dst sums, ending with src."""
    p = comb.softmax(-1) + eps
    p = p / (p.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(-1, keepdim=True) + eps)
        p = p / (p.sum(-2, keepdim=True) + eps)
    return p


def tk_coefficients(residual, fn, scale, base, norm_weight, *, iters, post_mult, norm_eps=1e-6, pre_eps=1e-6,
                    sinkhorn_eps=1e-6):
    n, C = residual.shape[-2:]
    if norm_weight is not None:
        fn = fn * norm_weight
    xf = residual.flatten(-2).float()
    mixes = (xf @ fn.t()) * torch.rsqrt(xf.square().sum(-1, keepdim=True) / (n * C) + norm_eps)
    s = torch.cat((scale[0].expand(n), scale[1].expand(n), scale[2].expand(n * n)))
    mixes = mixes * s + base
    pre = torch.sigmoid(mixes[..., :n]) + pre_eps
    post = torch.sigmoid(mixes[..., n : 2 * n]) * post_mult
    comb = tk_sinkhorn(mixes[..., 2 * n :].unflatten(-1, (n, n)), iters, sinkhorn_eps)
    return pre, post, comb


def tk_layer(residual, branch, fn, scale, base, norm_weight=None, *, iters, post_mult):
    """One mHC sub-layer as TileKernels computes it (mhc_pre -> branch -> mhc_post), fp32."""
    pre, post, comb = tk_coefficients(residual, fn, scale, base, norm_weight, iters=iters, post_mult=post_mult)
    layer_input = (residual * pre.unsqueeze(-1)).sum(-2)
    out = branch(layer_input)
    mixed = torch.einsum("...sd,...sc->...dc", comb, residual)  # out[dst] = Σ_src comb[src, dst] x[src]
    return out.unsqueeze(-2) * post.unsqueeze(-1) + mixed


def tk_head(residual, fn, scale, base, norm_weight=None, norm_eps=1e-6, pre_eps=1e-6):
    n, C = residual.shape[-2:]
    if norm_weight is not None:
        fn = fn * norm_weight
    xf = residual.flatten(-2).float()
    mix = (xf @ fn.t()) * torch.rsqrt(xf.square().sum(-1, keepdim=True) / (n * C) + norm_eps)
    w = torch.sigmoid(mix * scale + base) + pre_eps
    return (residual * w.unsqueeze(-1)).sum(-2)


def tk_params(n, C, device, norm_weight=False):
    D = n * n + 2 * n
    fn = torch.randn(D, n * C, device=device) * 0.2
    scale = torch.rand(3, device=device) + 0.5
    base = torch.randn(D, device=device)  # non-symmetric res block: the transpose matters
    nw = (torch.rand(n * C, device=device) + 0.5) if norm_weight else None
    return fn, scale, base, nw


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("iters, post_mult", [(20, 2.0), (10, 1.0), (1, 2.0)])
@pytest.mark.parametrize("norm_weight", [False, True])
def test_from_tilekernels_matches_reference(device, n, iters, post_mult, norm_weight):
    C = 8
    fn, scale, base, nw = tk_params(n, C, device, norm_weight)
    branch = nn.Sequential(nn.Linear(C, C), nn.Tanh()).to(device)
    hc = convert.from_tilekernels(fn, scale, base, nw, branch=branch, sinkhorn_iters=iters, post_mult=post_mult)
    x = torch.randn(3, 5, n, C, device=device)

    # coefficients: H_res is comb transposed
    pre, post, comb = tk_coefficients(x, fn, scale, base, nw, iters=iters, post_mult=post_mult)
    h_pre, h_post, h_res = hc.coefficients(x)
    torch.testing.assert_close(h_pre, pre, **TOL)
    torch.testing.assert_close(h_post, post, **TOL)
    torch.testing.assert_close(h_res, comb.mT, **TOL)
    if n > 2:  # (2x2 doubly stochastic matrices are symmetric) the test would miss a lost transpose otherwise
        assert not torch.allclose(comb, comb.mT, atol=1e-3)

    # the whole sub-layer, forward and backward
    fn_r, scale_r, base_r = (t.clone().requires_grad_() for t in (fn, scale, base))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = tk_layer(xa, branch, fn_r, scale_r, base_r, nw, iters=iters, post_mult=post_mult)
    yb = hc(xb)
    torch.testing.assert_close(yb, ya, **TOL)
    g = torch.randn_like(ya)
    grads_ref = torch.autograd.grad(ya, [xa, fn_r, scale_r, base_r], g)
    grads_hc = torch.autograd.grad(yb, [xb, hc.phi, hc.alpha, hc.bias], g)
    torch.testing.assert_close(grads_hc[0], grads_ref[0], **TOL)
    if nw is None:
        # the conversion is a permutation: it maps the gradients like the parameters
        as_hcext = convert.from_tilekernels(*grads_ref[1:])
        torch.testing.assert_close(grads_hc[1], as_hcext.phi, **TOL)
        torch.testing.assert_close(grads_hc[2], as_hcext.alpha, **TOL)
        torch.testing.assert_close(grads_hc[3], as_hcext.bias, **TOL)


def test_round_trip_is_exact(device):
    fn, scale, base, _ = tk_params(4, 16, device)
    back = convert.to_tilekernels(convert.from_tilekernels(fn, scale, base))
    assert set(back) == {"fn", "scale", "base"}
    assert torch.equal(back["fn"], fn) and torch.equal(back["scale"], scale) and torch.equal(back["base"], base)


def test_round_trip_with_norm_weight(device):
    fn, scale, base, nw = tk_params(4, 8, device, norm_weight=True)
    hc = convert.from_tilekernels(fn, scale, base, nw)
    folded = convert.to_tilekernels(hc)
    torch.testing.assert_close(folded["fn"], fn * nw)
    unfolded = convert.to_tilekernels(hc, norm_weight=nw)
    torch.testing.assert_close(unfolded["fn"], fn, rtol=1e-6, atol=1e-7)
    # and the re-imported module computes the same
    x = torch.randn(6, 4, 8, device=device)
    again = convert.from_tilekernels(**unfolded, norm_weight=nw)
    for a, b in zip(hc.coefficients(x), again.coefficients(x)):
        torch.testing.assert_close(b, a, **TOL)


def test_hcext_module_round_trip(device):
    """hcext -> TileKernels -> hcext keeps every parameter and the outputs."""
    hc = HyperConnection(8, 4, kind="mhc", sinkhorn_iters=7, post_mult=1.5).to(device)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    cfg = convert.tilekernels_config(hc)
    assert cfg == dict(mhc_mult=4, norm_eps=1e-6, post_mult_value=1.5, pre_eps=1e-6, sinkhorn_eps=1e-6, sinkhorn_repeat=7)
    tk = convert.to_tilekernels(hc)
    again = convert.from_tilekernels(**tk, sinkhorn_iters=cfg["sinkhorn_repeat"], post_mult=cfg["post_mult_value"])
    for name, p in hc.named_parameters():
        assert torch.equal(getattr(again, name), p), name
    x = torch.randn(5, 4, 8, device=device)
    lin = nn.Linear(8, 8).to(device)
    ref = tk_layer(x, lin, tk["fn"], tk["scale"], tk["base"], iters=7, post_mult=1.5)
    branch_input, add = hc(x)
    torch.testing.assert_close(add(lin(branch_input)), ref, **TOL)


def test_into_existing_module(device):
    fn, scale, base, _ = tk_params(4, 8, device)
    hc = HyperConnection(8, 4, kind="mhc", sinkhorn_iters=10).to(device)
    out = convert.from_tilekernels(fn, scale, base, module=hc)
    assert out is hc and hc.sinkhorn_iters == 10
    assert torch.equal(convert.to_tilekernels(hc)["fn"], fn)
    with pytest.raises(ValueError, match="module must be an mHC"):
        convert.from_tilekernels(fn, scale, base, module=HyperConnection(16, 4, kind="mhc"))
    with pytest.raises(ValueError, match="module must be an mHC"):
        convert.from_tilekernels(fn, scale, base, module=HyperConnection(8, 4, kind="hc"))


def test_bad_shapes():
    with pytest.raises(ValueError, match="n\\*n \\+ 2n"):
        convert.from_tilekernels(torch.zeros(23, 32), torch.ones(3), torch.zeros(23))
    with pytest.raises(ValueError, match="scale"):
        convert.from_tilekernels(torch.zeros(24, 32), torch.ones(2), torch.zeros(24))
    with pytest.raises(ValueError, match="base"):
        convert.from_tilekernels(torch.zeros(24, 32), torch.ones(3), torch.zeros(20))
    with pytest.raises(ValueError, match="norm_weight"):
        convert.from_tilekernels(torch.zeros(24, 32), torch.ones(3), torch.zeros(24), torch.ones(31))
    with pytest.raises(ValueError, match="kind='mhc'"):
        convert.to_tilekernels(HyperConnection(8, 4, kind="hc"))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("norm_weight", [False, True])
def test_head(device, padded, norm_weight):
    n, C = 4, 8
    fn = torch.randn(n, n * C, device=device) * 0.2
    scale, base = torch.rand(1, device=device) + 0.5, torch.randn(n, device=device)
    nw = (torch.rand(n * C, device=device) + 0.5) if norm_weight else None
    fn_in = torch.cat((fn, torch.zeros(n * n + n, n * C, device=device))) if padded else fn
    head = convert.head_from_tilekernels(fn_in, scale, base, nw)
    assert isinstance(head, StreamHead)
    x = torch.randn(3, 5, n, C, device=device)
    torch.testing.assert_close(head(x), tk_head(x, fn, scale, base, nw), **TOL)
    back = convert.head_to_tilekernels(head)
    torch.testing.assert_close(back["fn"], fn if nw is None else fn * nw)
    assert torch.equal(back["scale"], scale) and torch.equal(back["base"], base)
