"""Tests of the mHC coefficient ops against hcext.reference.mhc_coeffs: the public
hcext::mhc_coeffs, its autograd twin hcext::mhc_coeffs_fwd (which also returns the saved
proj and rstd) and hcext::mhc_backward. Values and gradients of x, phi, alpha, bias over
n, C, leading shapes, strides, Sinkhorn iterations and scalars; the dtype contract;
gradcheck; opcheck; what autograd saves; mhc_backward's optional gradients and its
layer-input path (the fused mhc_pre's backward); torch.compile; argument errors; CUDA vs CPU.

Parity runs through the shared scaffold (helpers.check_parity: the op and the reference on
the same sample, the same loss weights). Tolerances (fp32 and fp64 compare against the
reference run in fp64), all from helpers.TOLERANCES:
- outputs and the parameter gradients: the dtype's row (helpers.assert_scaled_close with
  scale None: torch.testing.assert_close's rule).
- grad_x: RMSNorm is scale invariant, so grad_x is the sum of a term through x̃ @ phi and
  a term through rstd that cancel along x. When n*C is tiny (n = C = 1: grad_x is zero up
  to norm_eps) the sum is far below either term and its rounding error is relative to the
  terms, not to the sum. The atol is scaled by the token's largest
  |term_proj| + |term_rstd| + |term_layer_input| (per token, not per element: the GEMM
  dproj @ phi^T cancels internally too; the largest over all tokens for x in a layout other
  than contiguous), plus the row's rtol * |expected|.
- bf16 / fp16 x: helpers' rule: the op's error vs the fp64 reference (on the same rounded x)
  is at most twice the error of the reference run in that dtype (bf16 x, fp32 parameters),
  plus the fp32 row's atol (for grad_x scaled by the terms as above).
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference
from helpers import (
    NONCONTIGUOUS, BadCase, Input, Result, assert_close_dtype, assert_rejects, assert_scaled_close, check_parity,
    compare_results, forward_backward, layout, layout_cases, requires_cuda, run_opcheck, sample,
)

OP = torch.ops.hcext.mhc_coeffs.default
FWD_OP = torch.ops.hcext.mhc_coeffs_fwd.default
BACKWARD_OP = torch.ops.hcext.mhc_backward.default

OUT_NAMES = ("h_pre", "h_post", "h_res")
INPUT_NAMES = ("x", "phi", "alpha", "bias")


def _width(n):
    return n * n + 2 * n


# ---------------------------------------------------------------------------------------
# Inputs


def _make_params(n, C, device, dtype=torch.float32):
    """Realistic scales: RMSNorm(x̃) @ phi ~ N(0, 1), alpha in [0.01, 1] (init 0.01), bias ~ N(0, 0.5)."""
    D = _width(n)
    phi = torch.randn(n * C, D, device=device, dtype=dtype) / math.sqrt(n * C)
    alpha = torch.empty(3, device=device, dtype=dtype).uniform_(0.01, 1.0)
    bias = torch.randn(D, device=device, dtype=dtype) * 0.5
    return phi, alpha, bias


# id -> (leading shape, layout of x [*lead, n, C]): the leading shapes contiguous, then every
# shared layout (helpers.LAYOUTS) at 5 tokens: "lead-permuted" is [n, 5, C] seen as [5, n, C]
# (tokens not outermost), "transposed" [5, C, n] seen as [5, n, C] (inner stride n).
LAYOUT_CASES = layout_cases(
    {"lead=()": (), "lead=(0,)": (0,), "lead=(5,)": (5,), "lead=(2,3)": (2, 3)},
    ["lead-permuted", "transposed", "sliced", "expanded", "offset"],
    lead=(5,),
)


def _x(layout_case, n, C, device, dtype=torch.float32):
    """x [*lead, n, C] for a LAYOUT_CASES id, as an Input (a leaf and the view the op sees)."""
    lead, kind = LAYOUT_CASES[layout_case]
    return layout(torch.randn(*lead, n, C, device=device, dtype=dtype), kind)


def _to64(tensors):
    return [t.detach().double() for t in tensors]


def _grad_x_terms(x, params, weights, grad_layer_input=None, sinkhorn_iters=20, norm_eps=1e-6, sinkhorn_eps=1e-6,
                  pre_eps=1e-6, post_mult=2.0):
    """|dL/dx| split by the path x takes (x̃ @ phi, rstd, and the layer input y = sum_i h_pre_i x_i when
    ``grad_layer_input`` is given), summed as magnitudes, in fp64: the scale of grad_x's rounding error.

    The reference's math with x entering each path as its own leaf (checked against the reference:
    the three terms add up to its grad_x).
    """
    n, C = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    phi, alpha, bias = _to64(params)
    x_proj, x_norm, x_layer = (x.detach().double().requires_grad_(True) for _ in range(3))
    rstd = torch.rsqrt(x_norm.reshape(*lead, n * C).pow(2).mean(-1, keepdim=True) + norm_eps)
    part_alpha = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    logits = (x_proj.reshape(*lead, n * C) @ phi) * rstd * part_alpha + bias
    h_pre = torch.sigmoid(logits[..., :n]) + pre_eps
    h_post = post_mult * torch.sigmoid(logits[..., n : 2 * n])
    h_res = reference.sinkhorn(logits[..., 2 * n :].reshape(*lead, n, n), sinkhorn_iters, sinkhorn_eps)
    loss = sum((h * w.double()).sum() for h, w in zip((h_pre, h_post, h_res), weights))
    if grad_layer_input is not None:
        loss = loss + (reference.stream_aggregate(x_layer, h_pre) * grad_layer_input.double()).sum()
    terms = [g for g in torch.autograd.grad(loss, (x_proj, x_norm, x_layer), allow_unused=True) if g is not None]

    # The split is the reference's math: its terms sum to the reference's gradient.
    x_ref = x.detach().double().requires_grad_(True)
    outs = reference.mhc_coeffs(x_ref, phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult)
    ref_loss = sum((h * w.double()).sum() for h, w in zip(outs, weights))
    if grad_layer_input is not None:
        ref_loss = ref_loss + (reference.stream_aggregate(x_ref, outs[0]) * grad_layer_input.double()).sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, (x_ref,))
    torch.testing.assert_close(sum(terms), ref_grad, atol=1e-12, rtol=1e-9)
    return sum(t.abs() for t in terms)


def _token_terms(terms):
    """The atol scale of grad_x: per token, the largest of its cancelling terms (see the docstring)."""
    return terms.amax(dim=(-2, -1), keepdim=True) if terms.numel() else terms


def _grad_x_scale(x, params, weights, **kwargs):
    """The scale of grad_x's rounding error for x (a tensor or an Input): per token for a tensor
    or a contiguous Input; through any other view, the largest over all tokens (the terms,
    carried back to the leaf, can no longer be split by token)."""
    view = x.tensor() if isinstance(x, Input) else x
    terms = _grad_x_terms(view, params, weights, **kwargs)
    if not isinstance(x, Input) or x.base.shape == view.shape:
        return _token_terms(terms)
    base = x.base.detach().double().requires_grad_(True)
    (base_terms,) = torch.autograd.grad(x.view(base), base, terms)  # a gather's adjoint: sums of magnitudes
    return base_terms.max() if base_terms.numel() else 1.0


def _sample(x, params, **kwargs):
    return sample(x, *params, names=INPUT_NAMES, **kwargs)


def _check_against_reference(x, params, dtype, **kwargs):
    """The op (through autograd) vs the fp64 reference for fp32 / fp64 x (a tensor or an Input):
    values and all four gradients, through the shared runner."""
    got, _ = check_parity(
        hcext.ops.mhc_coeffs, reference.mhc_coeffs, _sample(x, params, **kwargs), scale=None, out_names=OUT_NAMES,
        scales={"grad_x": lambda want: _grad_x_scale(x, params, want.weights, **kwargs)},
    )
    view = x.tensor() if isinstance(x, Input) else x
    n = view.shape[-2]
    for out, tail in zip(got.outs, ((n,), (n,), (n, n))):
        assert out.dtype == dtype and out.device == view.device
        assert out.shape == (*view.shape[:-2], *tail)
    assert got.grads["x"].dtype == view.dtype
    for name, p in zip(INPUT_NAMES[1:], params):
        assert got.grads[name].dtype == p.dtype and got.grads[name].shape == p.shape
    return got.outs, list(got.grads.values())


# ---------------------------------------------------------------------------------------
# Parity with the reference

# (n, C): the full n grid at C = 7 and 64; C = 1 and C = 1280 (the 3B model's width) for a few n.
NC_GRID = [(n, C) for C in (7, 64) for n in (1, 2, 3, 4, 8)] + [(1, 1), (3, 1), (4, 1), (1, 1280), (4, 1280)]


@pytest.mark.parametrize("layout_case", list(LAYOUT_CASES))
@pytest.mark.parametrize("n,C", NC_GRID)
def test_matches_reference_fp32(device, n, C, layout_case):
    x = _x(layout_case, n, C, device)
    if LAYOUT_CASES[layout_case][1] in NONCONTIGUOUS and n > 1 and C > 1:
        assert not x.tensor().is_contiguous()  # the case tests what it says
    _check_against_reference(x, _make_params(n, C, device), torch.float32)


SCALAR_CASES = {
    "iters=1": dict(sinkhorn_iters=1),
    "iters=20-explicit": dict(sinkhorn_iters=20),
    "iters=3": dict(sinkhorn_iters=3),
    "post_mult=1": dict(post_mult=1.0),  # TileKernels' default
    "pre_eps=0": dict(pre_eps=0.0),
    "pre_eps=0.1,post_mult=1.5": dict(pre_eps=0.1, post_mult=1.5),
    "norm_eps=0.5": dict(norm_eps=0.5),  # large enough to change rstd: its gradient too
    "sinkhorn_eps=1e-3": dict(sinkhorn_eps=1e-3),
    "all": dict(sinkhorn_iters=1, norm_eps=1e-4, sinkhorn_eps=0.0, pre_eps=1e-3, post_mult=1.0),
}


@pytest.mark.parametrize("case", list(SCALAR_CASES))
@pytest.mark.parametrize("n,C", [(4, 64), (3, 7)])
def test_matches_reference_scalars(device, n, C, case):
    x = torch.randn(6, n, C, device=device)
    _check_against_reference(x, _make_params(n, C, device), torch.float32, **SCALAR_CASES[case])


def test_scalars_change_the_result(device):
    # The defaults are the paper's (20 iterations, 2σ, +1e-6), and each argument is used.
    n, C = 4, 16
    x = torch.randn(5, n, C, device=device)
    params = _make_params(n, C, device)
    default = OP(x, *params)
    for out, ref in zip(default, OP(x, *params, 20, 1e-6, 1e-6, 1e-6, 2.0)):
        assert torch.equal(out, ref)
    h_pre, h_post, h_res = default
    other = {
        "sinkhorn_iters": OP(x, *params, sinkhorn_iters=1)[2],
        "norm_eps": OP(x, *params, norm_eps=10.0)[0],
        "sinkhorn_eps": OP(x, *params, sinkhorn_eps=0.1)[2],
    }
    assert not torch.allclose(other["sinkhorn_iters"], h_res, atol=1e-4)
    assert not torch.allclose(other["norm_eps"], h_pre, atol=1e-4)
    assert not torch.allclose(other["sinkhorn_eps"], h_res, atol=1e-4)
    torch.testing.assert_close(OP(x, *params, pre_eps=0.25)[0], h_pre - 1e-6 + 0.25)
    torch.testing.assert_close(OP(x, *params, post_mult=1.0)[1], h_post / 2)


def test_large_alpha_and_zero_token(device):
    # Larger logits (alpha = 3: peaked Sinkhorn inputs) and an all-zero token (rstd = 1/sqrt(norm_eps),
    # logits = bias): still finite and equal to the reference.
    n, C = 4, 32
    x = torch.randn(7, n, C, device=device)
    x[3] = 0
    phi, _, bias = _make_params(n, C, device)
    alpha = torch.tensor([3.0, 2.0, 3.0], device=device)
    outs, grads = _check_against_reference(x, (phi, alpha, bias), torch.float32)
    assert all(torch.isfinite(t).all() for t in outs + grads)
    h_pre, h_post, h_res = outs
    torch.testing.assert_close(h_pre[3], torch.sigmoid(bias[:n]) + 1e-6)
    torch.testing.assert_close(h_post[3], 2 * torch.sigmoid(bias[n : 2 * n]))


@pytest.mark.parametrize("layout_case", ["lead=(5,)", "lead=(0,)", "transposed"])
@pytest.mark.parametrize("n,C", [(1, 3), (3, 7), (4, 64), (8, 5)])
def test_matches_reference_fp64(device, n, C, layout_case):
    x = _x(layout_case, n, C, device, torch.float64)
    _check_against_reference(x, _make_params(n, C, device, torch.float64), torch.float64, sinkhorn_iters=7)


def test_coefficient_properties(device):
    # mHC Eq. 8: 0 < h_pre (+1e-6) < 1, 0 < h_post < 2, h_res rows sum to 1 and columns nearly so.
    n, C = 4, 64
    x = torch.randn(64, n, C, device=device)
    h_pre, h_post, h_res = OP(x, *_make_params(n, C, device))
    assert ((h_pre > 0) & (h_pre <= 1 + 1e-6)).all()
    assert ((h_post > 0) & (h_post < 2)).all()
    assert (h_res > 0).all()
    assert (h_res.sum(-1) - 1).abs().max().item() <= 1e-5
    assert (h_res.sum(-2) - 1).abs().max().item() <= 1e-3


def test_forward_op_returns_proj_and_rstd(device):
    # The backward relies on these: proj = x̃ @ phi (before the RMSNorm scale), rstd = 1/sqrt(mean(x̃²) + eps).
    n, C = 3, 10
    x = torch.randn(2, 4, n, C, device=device)
    phi, alpha, bias = _make_params(n, C, device)
    h_pre, h_post, h_res, proj, rstd = FWD_OP(x, phi, alpha, bias, 5, 1e-3, 1e-6, 1e-6, 2.0)
    xf = x.reshape(2, 4, n * C).double()
    assert proj.shape == (2, 4, _width(n)) and proj.dtype == torch.float32
    assert rstd.shape == (2, 4) and rstd.dtype == torch.float32
    assert_close_dtype(proj, (xf @ phi.double()).float())
    assert_close_dtype(rstd, torch.rsqrt(xf.pow(2).mean(-1) + 1e-3).float())
    for out, ref in zip((h_pre, h_post, h_res), OP(x, phi, alpha, bias, 5, 1e-3)):
        assert torch.equal(out, ref)
    assert not proj.requires_grad and not rstd.requires_grad


# ---------------------------------------------------------------------------------------
# bf16 / fp16 x: fp32 coefficients, gradient in x's dtype


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("n,C", [(1, 7), (4, 64), (8, 7), (4, 1280)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x(device, dtype, n, C, iters):
    # helpers' low-precision rule (twice the error of the reference run on the same bf16 / fp16
    # x, fp32 parameters); the atol for grad_x scales with its largest cancelling term.
    x = torch.randn(6, n, C, device=device).to(dtype)
    params = _make_params(n, C, device)
    got, _ = check_parity(
        hcext.ops.mhc_coeffs, reference.mhc_coeffs, _sample(x, params, sinkhorn_iters=iters), out_names=OUT_NAMES,
        scales={"grad_x": lambda want: _grad_x_terms(x, params, want.weights, sinkhorn_iters=iters).max().item()},
    )
    assert all(o.dtype == torch.float32 for o in got.outs)
    assert got.grads["x"].dtype == dtype and all(got.grads[k].dtype == torch.float32 for k in INPUT_NAMES[1:])


# ---------------------------------------------------------------------------------------
# gradcheck (fp64): x, phi, alpha, bias together


@pytest.mark.parametrize("iters", [3, 20])
@pytest.mark.parametrize("C", [2, 5])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_gradcheck(device, n, C, iters):
    x = torch.randn(2, n, C, device=device, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_(True) for p in _make_params(n, C, device, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: hcext.ops.mhc_coeffs(*a, sinkhorn_iters=iters), (x, *params))


def test_gradcheck_noncontiguous_and_scalars(device):
    base = torch.randn(3, 4, 2, device=device, dtype=torch.float64, requires_grad=True)  # [tokens, C, n]
    params = [p.requires_grad_(True) for p in _make_params(2, 4, device, torch.float64)]

    def fn(b, *p):
        return hcext.ops.mhc_coeffs(b.transpose(-1, -2), *p, 4, 1e-2, 1e-3, 0.1, 1.0)

    assert torch.autograd.gradcheck(fn, (base, *params))


# ---------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensor, aot dispatch with dynamic shapes)


def _mhc_samples(device):
    """(name, args) samples for opcheck of hcext::mhc_coeffs and hcext::mhc_coeffs_fwd."""
    def args(x, dtype=torch.float32, *scalars):
        return (x, *_make_params(x.shape[-2], x.shape[-1], device, dtype), *scalars)

    yield "fp32", args(torch.randn(3, 4, 8, device=device))
    yield "fp32-scalars", args(torch.randn(3, 4, 8, device=device), torch.float32, 3, 1e-5, 1e-4, 0.0, 1.0)
    yield "bf16", args(torch.randn(5, 4, 8, device=device).to(torch.bfloat16))
    yield "fp64", args(torch.randn(2, 3, 5, device=device, dtype=torch.float64), torch.float64, 4)
    yield "empty", args(torch.randn(0, 4, 8, device=device))
    yield "noncontiguous", args(torch.randn(4, 8, 3, device=device).transpose(-1, -2))
    yield "offset", args(layout(torch.randn(3, 4, 8, device=device), "offset").tensor())
    yield "lead=(2,3),n=1", args(torch.randn(2, 3, 1, 6, device=device))


MHC_SAMPLES = [name for name, _ in _mhc_samples("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", MHC_SAMPLES)
@pytest.mark.parametrize("op", [OP, FWD_OP], ids=["mhc_coeffs", "mhc_coeffs_fwd"])
def test_opcheck_forward(device, op, name, requires_grad):
    run_opcheck(op, dict(_mhc_samples(device))[name], requires_grad=requires_grad)


# which of (grad_layer_input, grad_h_pre, grad_h_post, grad_h_res) are passed
BACKWARD_GRADS = {
    "coeff-grads": (False, True, True, True),
    "all-grads": (True, True, True, True),
    "layer-input-only": (True, False, False, False),
    "res-only": (False, False, False, True),
    "pre-and-post": (False, True, True, False),
    "none": (False, False, False, False),
}


def _backward_args(x, params, present, iters=5, pre_eps=1e-6, post_mult=2.0):
    """Arguments of mhc_backward for x, with random incoming gradients where ``present`` says so."""
    lead, n, C = x.shape[:-2], x.shape[-2], x.shape[-1]
    _, _, _, proj, rstd = FWD_OP(x, *params, iters)
    gdtype = proj.dtype
    shapes = ((*lead, C), (*lead, n), (*lead, n), (*lead, n, n))
    grads = [torch.randn(s, device=x.device, dtype=gdtype) if p else None for s, p in zip(shapes, present)]
    return (x, *params, proj, rstd, *grads, iters, 1e-6, pre_eps, post_mult)


@pytest.mark.parametrize(
    "case", [*BACKWARD_GRADS, "bf16", "fp64", "empty", "noncontiguous-x", "grad-expanded"]
)
def test_opcheck_backward(device, case):
    n, C, dtype = 4, 8, torch.float32
    x = torch.randn(3, n, C, device=device)
    present = BACKWARD_GRADS.get(case, (True, True, True, True))
    if case == "bf16":
        x = x.to(torch.bfloat16)
    elif case == "fp64":
        x, dtype = x.double(), torch.float64
    elif case == "empty":
        x = x[:0]
    elif case == "noncontiguous-x":
        x = torch.randn(3, C, n, device=device).transpose(-1, -2)
    args = list(_backward_args(x, _make_params(n, C, device, dtype), present))
    if case == "grad-expanded":  # autograd may pass expanded gradients (e.g. from .sum())
        args[9] = torch.ones((), device=device).expand(3, n, n)
    run_opcheck(BACKWARD_OP, args)


# ---------------------------------------------------------------------------------------
# mhc_backward: optional gradients and the layer-input path


@pytest.mark.parametrize("present", list(BACKWARD_GRADS))
def test_backward_none_equals_zeros(device, present):
    n, C = 4, 16
    x = torch.randn(6, n, C, device=device)
    params = _make_params(n, C, device)
    args = list(_backward_args(x, params, BACKWARD_GRADS[present]))
    with_none = BACKWARD_OP(*args)
    for k in range(6, 10):
        if args[k] is None:
            shape = ((6, C), (6, n), (6, n), (6, n, n))[k - 6]
            args[k] = torch.zeros(shape, device=device)
    with_zeros = BACKWARD_OP(*args)
    for a, b in zip(with_none, with_zeros):
        assert_close_dtype(a, b)
    if present == "none":
        assert all((g == 0).all() for g in with_none)


@pytest.mark.parametrize("coeff_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,C", [(1, 5), (4, 64), (3, 7)])
def test_backward_layer_input_path(device, n, C, dtype, coeff_grads):
    # mhc_backward(grad_layer_input=gy, ...) is the backward of the fused mhc_pre:
    # L = sum_k g_k * h_k + sum gy * y with y = sum_i h_pre_i x_i (reference.stream_aggregate).
    x = torch.randn(2, 3, n, C, device=device, dtype=dtype)
    params = _make_params(n, C, device, dtype)
    present = (True, coeff_grads, coeff_grads, coeff_grads)
    args = _backward_args(x, params, present, iters=6, pre_eps=1e-3, post_mult=1.5)
    gy, g_coeffs = args[6], args[7:10]
    grads = BACKWARD_OP(*args)

    kw = dict(sinkhorn_iters=6, pre_eps=1e-3, post_mult=1.5)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, *params)]
    outs = reference.mhc_coeffs(*leaves, **kw)
    loss = (reference.stream_aggregate(leaves[0], outs[0]) * gy.double()).sum()
    weights = [g if g is not None else torch.zeros_like(o) for g, o in zip(g_coeffs, outs)]
    loss = loss + sum((o * w.double()).sum() for o, w in zip(outs, weights))
    ref_grads = torch.autograd.grad(loss, leaves)

    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    terms = _grad_x_terms(x, params, weights, grad_layer_input=gy, **kw)
    assert_scaled_close(grads[0], ref_grads[0], dtype, "grad_x", scale=_token_terms(terms))
    for g, ref in zip(grads[1:], ref_grads[1:]):
        assert_close_dtype(g, ref.to(dtype))


def test_backward_layer_input_bf16(device):
    # bf16 streams (the model's case): grad_x is the fp32 sum of all three paths, rounded once.
    n, C = 4, 64
    x = torch.randn(8, n, C, device=device).to(torch.bfloat16)
    params = _make_params(n, C, device)
    args = _backward_args(x, params, (True, True, True, True))
    grads = BACKWARD_OP(*args)
    assert grads[0].dtype == torch.bfloat16
    ref32 = BACKWARD_OP(x.float(), *args[1:])  # the same math on the same values, fp32 out
    assert_close_dtype(grads[0], ref32[0].to(torch.bfloat16))
    for g, ref in zip(grads[1:], ref32[1:]):
        assert_close_dtype(g, ref)


def test_autograd_uses_backward_op(device):
    # The registered autograd formula is mhc_backward without a layer-input gradient.
    n, C = 3, 9
    x = torch.randn(4, n, C, device=device)
    params = _make_params(n, C, device)
    autograd = forward_backward(hcext.ops.mhc_coeffs, _sample(x, params, sinkhorn_iters=4))
    _, _, _, proj, rstd = FWD_OP(x, *params, 4)
    direct = BACKWARD_OP(x, *params, proj, rstd, None, *autograd.weights, 4, 1e-6, 1e-6, 2.0)
    compare_results(autograd, Result(autograd.outs, dict(zip(INPUT_NAMES, direct)), []), scale=None)


# ---------------------------------------------------------------------------------------
# Memory: autograd keeps the inputs, proj and rstd only


def test_autograd_saves_only_proj_and_rstd(device):
    T, n, C = 16, 4, 64
    x = torch.randn(T, n, C, device=device).to(torch.bfloat16).requires_grad_(True)
    params = [p.requires_grad_(True) for p in _make_params(n, C, device)]
    inputs = {t.data_ptr() for t in (x, *params)}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = hcext.ops.mhc_coeffs(x, *params)
    extra = [t for t in saved if t.data_ptr() not in inputs]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    description = [(tuple(t.shape), t.dtype) for t in extra]
    # proj [T, n*n+2n] and rstd [T] in fp32: no [..., n, C] intermediate, no Sinkhorn history
    assert extra_bytes == T * _width(n) * 4 + T * 4, description
    assert sorted(t.numel() for t in extra) == [T, T * _width(n)], description
    assert all(t.dtype == torch.float32 for t in extra), description
    # and they suffice for a correct backward: the saved tensors' grads vs the reference's on
    # the same bf16 x, with the shared loss weights
    ref = forward_backward(reference.mhc_coeffs, _sample(x, params))
    sum((o * w).sum() for o, w in zip(outs, ref.weights)).backward()
    assert x.grad.dtype == torch.bfloat16
    compare_results(Result(ref.outs, dict(zip(INPUT_NAMES, (x.grad, *[p.grad for p in params]))), []), ref,
                    scale=None)


def test_no_grad_inputs_record_no_graph(device):
    n, C = 2, 3
    outs = OP(torch.randn(3, n, C, device=device), *_make_params(n, C, device))
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)


# ---------------------------------------------------------------------------------------
# torch.compile


def _mhc_step(x, phi, alpha, bias):
    # A minimal mHC residual step that uses every output: the layer input y = H_pre x, an
    # identity "layer", then x' = H_res x + H_post^T y.
    h_pre, h_post, h_res = hcext.ops.mhc_coeffs(x * 1.5, phi, alpha, bias, sinkhorn_iters=5, post_mult=1.0)
    y = (h_pre.unsqueeze(-1) * x).sum(-2)
    return h_res @ x + h_post.unsqueeze(-1) * y.unsqueeze(-2)


def _compare_step(step, x, params, device):
    w = torch.randn(x.shape, device=device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    eager_leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    out = step(*leaves)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    out_eager = _mhc_step(*eager_leaves)
    eager_grads = torch.autograd.grad((out_eager * w).sum(), eager_leaves)
    assert_close_dtype(out, out_eager)
    for g, ref in zip(grads, eager_grads):
        assert_close_dtype(g, ref)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_matches_eager(device, fresh_dynamo, backend):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_mhc_step, backend=counter, fullgraph=True)
    n, C = 4, 16
    _compare_step(compiled, torch.randn(6, n, C, device=device), _make_params(n, C, device), device)
    assert counter.frame_count == 1


def test_compile_dynamic_tokens_do_not_recompile(device, fresh_dynamo):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_mhc_step, backend=counter, fullgraph=True, dynamic=True)
    n, C = 4, 8
    params = _make_params(n, C, device)
    # Token counts unlike every other size in the call (3 = alpha's length, n, C, n*C, n*n+2n):
    # dynamo's duck shaping would give equal sizes one symbol, and alpha's is specialised to 3.
    _compare_step(compiled, torch.randn(5, n, C, device=device), params, device)
    # The first compile may count twice: with dynamic=True dynamo first traces the float
    # arguments of the CompositeImplicitAutograd mhc_coeffs symbolically, then restarts the
    # analysis to specialise them (no guard on the token count is involved).
    frames = counter.frame_count
    for tokens in (11, 17):
        _compare_step(compiled, torch.randn(tokens, n, C, device=device), params, device)
    assert counter.frame_count == frames
    with torch.compiler.set_stance("fail_on_recompile"):
        _compare_step(compiled, torch.randn(29, n, C, device=device), params, device)
    assert counter.frame_count == frames


def test_compile_inductor(device, fresh_dynamo):
    # Kept tiny (inductor compiles take minutes on small CI machines).
    compiled = torch.compile(_mhc_step, backend="inductor", fullgraph=True)
    n, C = 2, 4
    _compare_step(compiled, torch.randn(3, n, C, device=device), _make_params(n, C, device), device)


# ---------------------------------------------------------------------------------------
# Argument errors: a RuntimeError that names the offending argument


def _bad_calls():
    """BadCases: make(device) gives the call (x, phi, alpha, bias, **scalars) as a Sample."""

    def valid(name, match, n=4, C=8, x_dtype=torch.float32, **changes):
        def make(d):
            x = torch.randn(2, n, C, device=d).to(x_dtype)
            phi, alpha, bias = _make_params(n, C, d)
            parts = dict(x=x, phi=phi, alpha=alpha, bias=bias)
            scalars = {}
            for key, value in changes.items():
                if key in parts:
                    parts[key] = value(d) if callable(value) else value
                else:
                    scalars[key] = value
            return sample(*parts.values(), **scalars)

        return BadCase(name, make, match)

    def randn(*shape, dtype=torch.float32):
        return lambda d: torch.randn(*shape, device=d, dtype=dtype)

    return [
        valid("phi-rows", r"phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]", phi=randn(31, 24)),
        valid("phi-cols", r"phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]", phi=randn(32, 23)),
        valid("phi-1d", r"phi of shape \[n\*C, n\*n\+2n\]", phi=randn(32 * 24)),
        valid("phi-transposed", r"phi of shape \[n\*C, n\*n\+2n\]", phi=randn(24, 32)),
        valid("alpha-4", r"alpha of shape \[3\]", alpha=randn(4)),
        valid("alpha-2d", r"alpha of shape \[3\]", alpha=randn(1, 3)),
        valid("alpha-0d", r"alpha of shape \[3\]", alpha=randn(())),
        valid("bias-23", r"bias of shape \[n\*n\+2n\] = \[24\]", bias=randn(23)),
        valid("bias-2d", r"bias of shape \[n\*n\+2n\] = \[24\]", bias=randn(1, 24)),
        valid("phi-bf16", r"phi of dtype", phi=randn(32, 24, dtype=torch.bfloat16)),
        valid("alpha-fp64", r"alpha of dtype", alpha=randn(3, dtype=torch.float64)),
        valid("bias-fp16", r"bias of dtype", bias=randn(24, dtype=torch.float16)),
        valid("fp64-x-fp32-phi", r"phi of dtype", x_dtype=torch.float64),
        valid("x-int", r"x of dtype .*got \S*(Long|int64)", x=lambda d: torch.randint(0, 5, (2, 4, 8), device=d)),
        valid("x-1d", r"x of shape \[\.\.\., n, C\] with at least 2 dims", x=randn(8)),
        valid("n=33", r"n = x.size\(-2\) in \[1, 32\], got 33", n=33, C=1),
        valid("n=0", r"n = x.size\(-2\) in \[1, 32\], got 0", x=randn(2, 0, 8)),
        valid("C=0", r"C = x.size\(-1\) >= 1, got 0", x=randn(2, 4, 0), phi=randn(0, 24)),
        valid("iters=0", r"sinkhorn_iters in \[1, 1048576\], got 0", sinkhorn_iters=0),
        valid("iters=-1", r"sinkhorn_iters in \[1, 1048576\], got -1", sinkhorn_iters=-1),
        valid("sinkhorn_eps<0", r"sinkhorn_eps finite and >= 0", sinkhorn_eps=-1e-3),
        valid("sinkhorn_eps=nan", r"sinkhorn_eps finite and >= 0, got nan", sinkhorn_eps=math.nan),
        valid("norm_eps<0", r"norm_eps finite and >= 0", norm_eps=-1e-6),
        valid("norm_eps=inf", r"norm_eps finite and >= 0, got inf", norm_eps=math.inf),
        valid("pre_eps=nan", r"pre_eps finite", pre_eps=math.nan),
        valid("pre_eps=-inf", r"pre_eps finite", pre_eps=-math.inf),
        valid("post_mult=inf", r"post_mult finite", post_mult=math.inf),
        valid("post_mult=nan", r"post_mult finite", post_mult=math.nan),
    ]


BAD_CALLS = {case.id: case for case in _bad_calls()}
# Cases that mhc_backward checks too (it takes no norm_eps).
BACKWARD_BAD_CALLS = [c for c in BAD_CALLS if not c.startswith("norm_eps")]


@pytest.mark.parametrize("entry", ["op", "fwd_op", "wrapper"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise(device, case, entry):
    fn = {"op": OP, "fwd_op": FWD_OP, "wrapper": hcext.ops.mhc_coeffs}[entry]
    assert_rejects(fn, BAD_CALLS[case], device, prefix=r"hcext::mhc_coeffs: .*")


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_in_fake_kernel(case):
    # torch.compile / export see the fake kernel: it must reject the same inputs.
    assert_rejects(OP, BAD_CALLS[case], "meta")


def _valid_backward_args(device, n=4, C=8):
    x = torch.randn(3, n, C, device=device)
    return list(_backward_args(x, _make_params(n, C, device), (True, True, True, True)))


def _backward_of_forward_args(x, phi, alpha, bias, sinkhorn_iters=5, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0):
    """mhc_backward for mhc_coeffs' arguments, with proj / rstd / grad_h_res shaped for x as given."""
    lead, n = (x.shape[:-2], x.shape[-2]) if x.dim() >= 2 else ((), 4)
    proj = torch.randn(*lead, _width(n), device=x.device)
    rstd = torch.rand(lead, device=x.device)
    g = torch.randn(*lead, n, n, device=x.device)
    return BACKWARD_OP(x, phi, alpha, bias, proj, rstd, None, None, None, g, sinkhorn_iters=sinkhorn_iters,
                       sinkhorn_eps=sinkhorn_eps, pre_eps=pre_eps, post_mult=post_mult)


@pytest.mark.parametrize("case", BACKWARD_BAD_CALLS)
def test_backward_bad_arguments_raise(device, case):
    assert_rejects(_backward_of_forward_args, BAD_CALLS[case], device, prefix=r"hcext::mhc_backward: .*")


def _bad_backward_calls():
    """BadCases of mhc_backward: the valid arguments for x [3, 4, 8] (_valid_backward_args) with one replaced."""

    def replace(name, index, replacement, match):
        def make(d):
            args = _valid_backward_args(d)
            args[index] = replacement(d)
            return sample(*args)

        return BadCase(name, make, match)

    return [
        replace("proj-cols", 4, lambda d: torch.randn(3, 25, device=d), r"proj of shape \[\.\.\., 24\]"),
        replace("proj-tokens", 4, lambda d: torch.randn(4, 24, device=d), r"proj of shape \[\.\.\., 24\]"),
        replace("proj-fp64", 4, lambda d: torch.randn(3, 24, device=d, dtype=torch.float64), r"proj of dtype"),
        replace("rstd-numel", 5, lambda d: torch.rand(4, device=d), r"rstd with one value per token \(3\)"),
        replace("rstd-fp16", 5, lambda d: torch.rand(3, device=d, dtype=torch.float16), r"rstd of dtype"),
        replace("grad_layer_input-numel", 6, lambda d: torch.randn(3, 7, device=d),
                r"grad_layer_input with 24 elements"),
        replace("grad_h_pre-numel", 7, lambda d: torch.randn(3, 5, device=d), r"grad_h_pre with 12 elements"),
        replace("grad_h_post-numel", 8, lambda d: torch.randn(2, 4, device=d), r"grad_h_post with 12 elements"),
        replace("grad_h_res-numel", 9, lambda d: torch.randn(3, 4, 3, device=d), r"grad_h_res with 48 elements"),
        replace("grad_h_res-int", 9, lambda d: torch.ones(3, 4, 4, device=d, dtype=torch.int64),
                r"grad_h_res .*floating"),
    ]


BAD_BACKWARD = {case.id: case for case in _bad_backward_calls()}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_bad_saved_or_grads_raise(device, case):
    BACKWARD_OP(*_valid_backward_args(device))  # valid as built
    assert_rejects(BACKWARD_OP, BAD_BACKWARD[case], device, prefix=r"hcext::mhc_backward: .*")


@pytest.mark.parametrize("case", ["proj-cols", "rstd-numel", "grad_h_res-numel"])
def test_backward_bad_saved_or_grads_raise_in_fake_kernel(case):
    assert_rejects(BACKWARD_OP, BAD_BACKWARD[case], "meta")


# ---------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.parametrize("name", ["phi", "alpha", "bias"])
def test_cuda_parameter_on_cpu_raises(name):
    def make(d):
        n, C = 4, 8
        params = dict(zip(("phi", "alpha", "bias"), _make_params(n, C, d)))
        params[name] = params[name].cpu()
        return sample(torch.randn(3, n, C, device=d), *params.values())

    assert_rejects(OP, BadCase(f"{name}-on-cpu", make, rf"expected {name} on cuda"), "cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,C", [(1, 64), (4, 64), (4, 1280), (5, 7), (16, 32)])
def test_cuda_matches_cpu(n, C, dtype):
    tokens = 300
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x_cpu = torch.randn(tokens, n, C).to(dtype)
    params_cpu = _make_params(n, C, "cpu", pdtype)
    s = _sample(x_cpu, params_cpu, sinkhorn_iters=20)
    gy_cpu = torch.randn(tokens, C, dtype=pdtype)

    results = {}
    for dev in ("cpu", "cuda"):
        autograd = forward_backward(hcext.ops.mhc_coeffs, s.to(dev))
        x, params, weights = x_cpu.to(dev), [p.to(dev) for p in params_cpu], [w.to(dev) for w in autograd.weights]
        _, _, _, proj, rstd = FWD_OP(x, *params, 20)
        fused = BACKWARD_OP(x, *params, proj, rstd, gy_cpu.to(dev), *weights, 20, 1e-6, 1e-6, 2.0)
        results[dev] = (autograd, Result([], dict(zip(INPUT_NAMES, fused)), []))
    for out_gpu in results["cuda"][0].outs:
        assert out_gpu.device.type == "cuda"
    # autograd's backward (no layer input), then mhc_backward with one
    for k, gy in ((0, None), (1, gy_cpu)):
        cpu, gpu = results["cpu"][k], results["cuda"][k]
        assert gpu.grads["x"].dtype == dtype and gpu.grads["x"].device.type == "cuda"
        if dtype == torch.bfloat16:  # both round the same fp32 sum once: at most an ulp apart
            grad_x_scale = None
        else:
            grad_x_scale = _token_terms(_grad_x_terms(x_cpu, params_cpu, results["cpu"][0].weights,
                                                      grad_layer_input=gy))
        compare_results(gpu.to("cpu"), cpu, scale=None, scales={"grad_x": grad_x_scale},
                        out_names=OUT_NAMES[:len(cpu.outs)])


@requires_cuda
def test_cuda_noncontiguous_x_and_empty():
    n, C = 4, 16
    params_cpu = _make_params(n, C, "cpu")
    for x_cpu in (torch.randn(5, C, n).transpose(-1, -2), torch.randn(0, n, C), torch.randn(2, 3, n, C)):
        s = _sample(x_cpu, params_cpu)
        compare_results(forward_backward(OP, s.to("cuda")).to("cpu"), forward_backward(OP, s), scale=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,C", [(4, 40), (4, 128), (4, 300), (6, 96)])
def test_layer_input_paths_agree(device, n, C, dtype):
    """mhc_pre's layer input and coefficients against mhc_coeffs + stream_aggregate, for row sizes
    on both sides of CUDA's resident projection budget (32 tokens' rows in 80 KB of shared memory:
    n*C*sizeof(x) <= 2.5 KB; bf16 n = 4, C = 128 needs the opt-in above 48 KB of shared memory in
    all). proj, rstd and the coefficients are bitwise mhc_coeffs' on every backend; the layer input
    equals stream_aggregate's to rounding (bitwise on CUDA, where the resident kernel runs
    stream_aggregate's arithmetic; tests/emu checks that)."""
    T = 45
    cd = torch.float32
    g = torch.Generator().manual_seed(8)
    D = n * n + 2 * n
    x = torch.randn(T, n, C, generator=g).to(dtype).to(device)
    phi = (torch.randn(n * C, D, generator=g) / math.sqrt(n * C)).to(cd).to(device)
    alpha = torch.tensor([0.7, 0.8, 0.9], dtype=cd, device=device)
    bias = (0.5 * torch.randn(D, generator=g)).to(cd).to(device)
    scalars = (20, 1e-6, 1e-6, 1e-6, 2.0)
    layer_input, h_post, h_res, proj, rstd = torch.ops.hcext.mhc_pre_fwd(x, phi, alpha, bias, *scalars)
    h_pre_c, h_post_c, h_res_c, proj_c, rstd_c = torch.ops.hcext.mhc_coeffs_fwd(x, phi, alpha, bias, *scalars)
    for a, b in ((proj, proj_c), (rstd, rstd_c), (h_post, h_post_c), (h_res, h_res_c)):
        assert torch.equal(a, b)
    want = torch.ops.hcext.stream_aggregate(x, h_pre_c)
    if x.is_cuda:
        assert torch.equal(layer_input, want)
    else:
        assert_scaled_close(layer_input, want, dtype, name="layer_input")
