"""Tests of the mHC coefficient ops against hcext.reference.mhc_coeffs: the public
hcext::mhc_coeffs, its autograd twin hcext::mhc_coeffs_fwd (which also returns the saved
proj and rstd) and hcext::mhc_backward. Values and gradients of x, phi, alpha, bias over
n, C, leading shapes, strides, Sinkhorn iterations and scalars; the dtype contract;
gradcheck; opcheck; what autograd saves; mhc_backward's optional gradients and its
layer-input path (the fused mhc_pre's backward); torch.compile; argument errors; CUDA vs CPU.

Tolerances (fp32 and fp64 compare against the reference run in fp64):
- outputs and the parameter gradients: the dtype's row of helpers.TOLERANCES.
- grad_x: RMSNorm is scale invariant, so grad_x is the sum of a term through x̃ @ phi and
  a term through rstd that cancel along x. When n*C is tiny (n = C = 1: grad_x is zero up
  to norm_eps) the sum is far below either term and its rounding error is relative to the
  terms, not to the sum. The bound is GRAD_X_TERM_TOL[dtype] times the token's largest
  |term_proj| + |term_rstd| + |term_layer_input| (per token, not per element: the GEMM
  dproj @ phi^T cancels internally too), plus the table's rtol * |expected|.
- bf16 / fp16 x: the op's error vs the fp64 reference (on the same rounded x) is at most
  twice the error of the reference run in that dtype (bf16 x, fp32 parameters), plus a
  small atol; for grad_x the atol scales with the terms as above.
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference
from helpers import TOLERANCES, assert_close_dtype, requires_cuda

OP = torch.ops.hcext.mhc_coeffs.default
FWD_OP = torch.ops.hcext.mhc_coeffs_fwd.default
BACKWARD_OP = torch.ops.hcext.mhc_backward.default

# grad_x error bound per unit of its token's largest cancelling term (see the docstring).
# Measured on this file's CPU cases: fp32 <= 8e-7, fp64 <= 7e-16.
GRAD_X_TERM_TOL = {torch.float32: 1e-5, torch.float64: 1e-13}

# bf16 / fp16 x: "twice the reference's own error" plus a small atol. The coefficients and the
# parameter gradients are fp32 computations on the same (rounded) x in the op and in the
# low-precision reference, so the atol is fp32-sized: LOWP_ATOL absolute for the coefficients,
# LOWP_ATOL * 10 relative to the largest value for the parameter gradients (sums over tokens),
# GRAD_X_TERM_TOL[fp32] of the largest term for grad_x (measured slack: < 40% of these).
LOWP_ATOL = 1e-6


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


# name -> x of shape [..., n, C], possibly a non-contiguous view
LAYOUTS = {
    "lead=()": lambda n, C, **kw: torch.randn(n, C, **kw),
    "lead=(0,)": lambda n, C, **kw: torch.randn(0, n, C, **kw),
    "lead=(5,)": lambda n, C, **kw: torch.randn(5, n, C, **kw),
    "lead=(2,3)": lambda n, C, **kw: torch.randn(2, 3, n, C, **kw),
    # tokens not outermost in memory: [n, 5, C] seen as [5, n, C]
    "tokens-strided": lambda n, C, **kw: torch.randn(n, 5, C, **kw).transpose(0, 1),
    # channels outermost: [5, C, n] seen as [5, n, C] (inner stride n)
    "streams-transposed": lambda n, C, **kw: torch.randn(5, C, n, **kw).transpose(-1, -2),
    # every other channel of [5, n, 2C]: inner stride 2
    "sliced": lambda n, C, **kw: torch.randn(5, n, 2 * C, **kw)[..., ::2],
}
NONCONTIGUOUS = {"tokens-strided", "streams-transposed", "sliced"}


def _output_weights(x, dtype):
    """Random weights for the three outputs of x [..., n, C]: the loss is sum_k sum(w_k * out_k)."""
    lead, n = x.shape[:-2], x.shape[-2]
    return [torch.randn(*lead, *tail, device=x.device, dtype=dtype) for tail in ((n,), (n,), (n, n))]


def _forward_backward(fn, x, params, weights, **kwargs):
    """(outputs, [grad_x, grad_phi, grad_alpha, grad_bias]) of sum_k sum(w_k * fn(...)_k) for fresh leaves."""
    leaves = [t.detach().requires_grad_(True) for t in (x, *params)]  # detach keeps x's strides
    outs = fn(*leaves, **kwargs)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


def _to64(tensors):
    return [t.detach().double() for t in tensors]


def _reference64(x, params, weights, **kwargs):
    """The reference in fp64 on the same (possibly rounded) values."""
    return _forward_backward(reference.mhc_coeffs, x.detach().double(), _to64(params), _to64(weights), **kwargs)


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


def _assert_grad_x_close(actual, expected, terms, dtype):
    """grad_x vs the fp64 reference: error <= GRAD_X_TERM_TOL * (the token's largest term) + rtol * |expected|."""
    assert actual.shape == expected.shape and actual.device == expected.device
    err = (actual.double() - expected.double()).abs()
    # Per token: the GEMM dproj @ phi^T has its own cancellation, so an element's error follows
    # the token's largest terms rather than its own.
    token_terms = terms.amax(dim=(-2, -1), keepdim=True) if terms.numel() else terms
    bound = GRAD_X_TERM_TOL[dtype] * token_terms.to(err.device) + TOLERANCES[dtype]["rtol"] * expected.double().abs()
    bad = err > bound
    assert not bad.any(), (
        f"grad_x: {int(bad.sum())} of {err.numel()} elements off; worst error {err.max().item():.3e}, "
        f"largest term {terms.max().item():.3e}, largest |grad| {expected.abs().max().item():.3e}"
    )


def _check_against_reference(x, params, dtype, **kwargs):
    """The op (through autograd) vs the fp64 reference for fp32 / fp64 x: values and all four gradients."""
    weights = _output_weights(x, dtype)
    outs, grads = _forward_backward(hcext.ops.mhc_coeffs, x, params, weights, **kwargs)
    ref_outs, ref_grads = _reference64(x, params, weights, **kwargs)
    n = x.shape[-2]
    for out, ref, tail in zip(outs, ref_outs, ((n,), (n,), (n, n))):
        assert out.dtype == dtype and out.device == x.device
        assert out.shape == (*x.shape[:-2], *tail)
        assert_close_dtype(out, ref.to(dtype))
    grad_x, grad_params = grads[0], grads[1:]
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
    _assert_grad_x_close(grad_x, ref_grads[0].to(dtype), _grad_x_terms(x, params, weights, **kwargs), dtype)
    for name, g, ref, p in zip(("phi", "alpha", "bias"), grad_params, ref_grads[1:], params):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert_close_dtype(g, ref.to(dtype), msg=lambda m, name=name: f"grad_{name}: {m}")
    return outs, grads


# ---------------------------------------------------------------------------------------
# Parity with the reference

# (n, C): the full n grid at C = 7 and 64; C = 1 and C = 1280 (the 3B model's width) for a few n.
NC_GRID = [(n, C) for C in (7, 64) for n in (1, 2, 3, 4, 8)] + [(1, 1), (3, 1), (4, 1), (1, 1280), (4, 1280)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("n,C", NC_GRID)
def test_matches_reference_fp32(device, n, C, layout):
    x = LAYOUTS[layout](n, C, device=device)
    if layout in NONCONTIGUOUS and n > 1 and C > 1:
        assert not x.is_contiguous()  # the case tests what it says
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


@pytest.mark.parametrize("layout", ["lead=(5,)", "lead=(0,)", "streams-transposed"])
@pytest.mark.parametrize("n,C", [(1, 3), (3, 7), (4, 64), (8, 5)])
def test_matches_reference_fp64(device, n, C, layout):
    x = LAYOUTS[layout](n, C, device=device, dtype=torch.float64)
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


def _assert_within_twice_reference_error(name, actual, ref64, ref_lowp, atol):
    err = (actual.double() - ref64).abs().max().item() if actual.numel() else 0.0
    ref_err = (ref_lowp.double() - ref64).abs().max().item() if actual.numel() else 0.0
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.3e} vs the low-precision reference's {ref_err:.3e}"


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("n,C", [(1, 7), (4, 64), (8, 7), (4, 1280)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x(device, dtype, n, C, iters):
    x = torch.randn(6, n, C, device=device).to(dtype)
    params = _make_params(n, C, device)
    weights = _output_weights(x, torch.float32)
    outs, grads = _forward_backward(hcext.ops.mhc_coeffs, x, params, weights, sinkhorn_iters=iters)
    lowp_outs, lowp_grads = _forward_backward(reference.mhc_coeffs, x, params, weights, sinkhorn_iters=iters)
    ref_outs, ref_grads = _reference64(x, params, weights, sinkhorn_iters=iters)
    assert all(o.dtype == torch.float32 for o in outs)
    assert grads[0].dtype == dtype and all(g.dtype == torch.float32 for g in grads[1:])
    for name, out, ref, lowp in zip(("h_pre", "h_post", "h_res"), outs, ref_outs, lowp_outs):
        _assert_within_twice_reference_error(name, out, ref, lowp, LOWP_ATOL)
    terms = _grad_x_terms(x, params, weights, sinkhorn_iters=iters)
    grad_x_atol = GRAD_X_TERM_TOL[torch.float32] * terms.max().item()
    _assert_within_twice_reference_error("grad_x", grads[0], ref_grads[0], lowp_grads[0], grad_x_atol)
    for name, g, ref, lowp in zip(("phi", "alpha", "bias"), grads[1:], ref_grads[1:], lowp_grads[1:]):
        scale = ref.abs().max().item()
        _assert_within_twice_reference_error(f"grad_{name}", g, ref, lowp, 10 * LOWP_ATOL * max(scale, 1.0))


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
    yield "lead=(2,3),n=1", args(torch.randn(2, 3, 1, 6, device=device))


MHC_SAMPLES = [name for name, _ in _mhc_samples("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", MHC_SAMPLES)
@pytest.mark.parametrize("op", [OP, FWD_OP], ids=["mhc_coeffs", "mhc_coeffs_fwd"])
def test_opcheck_forward(device, op, sample, requires_grad):
    args = dict(_mhc_samples(device))[sample]
    if requires_grad:
        args = tuple(a.detach().requires_grad_(True) for a in args[:4]) + args[4:]
    torch.library.opcheck(op, args)


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
    "sample", [*BACKWARD_GRADS, "bf16", "fp64", "empty", "noncontiguous-x", "grad-expanded"]
)
def test_opcheck_backward(device, sample):
    n, C, dtype = 4, 8, torch.float32
    x = torch.randn(3, n, C, device=device)
    present = BACKWARD_GRADS.get(sample, (True, True, True, True))
    if sample == "bf16":
        x = x.to(torch.bfloat16)
    elif sample == "fp64":
        x, dtype = x.double(), torch.float64
    elif sample == "empty":
        x = x[:0]
    elif sample == "noncontiguous-x":
        x = torch.randn(3, C, n, device=device).transpose(-1, -2)
    args = list(_backward_args(x, _make_params(n, C, device, dtype), present))
    if sample == "grad-expanded":  # autograd may pass expanded gradients (e.g. from .sum())
        args[9] = torch.ones((), device=device).expand(3, n, n)
    torch.library.opcheck(BACKWARD_OP, tuple(args))


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
    _assert_grad_x_close(grads[0], ref_grads[0].to(dtype), terms, dtype)
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
    x = torch.randn(4, n, C, device=device, requires_grad=True)
    params = [p.requires_grad_(True) for p in _make_params(n, C, device)]
    outs = hcext.ops.mhc_coeffs(x, *params, sinkhorn_iters=4)
    weights = _output_weights(x, torch.float32)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), (x, *params))
    _, _, _, proj, rstd = FWD_OP(x.detach(), *[p.detach() for p in params], 4)
    direct = BACKWARD_OP(x.detach(), *[p.detach() for p in params], proj, rstd, None, *weights, 4, 1e-6, 1e-6, 2.0)
    for a, b in zip(grads, direct):
        assert_close_dtype(a, b)


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
    # and they suffice for a correct backward
    weights = _output_weights(x, torch.float32)
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    _, ref_grads = _forward_backward(reference.mhc_coeffs, x, params, weights)
    assert x.grad.dtype == torch.bfloat16
    assert_close_dtype(x.grad, ref_grads[0])
    for p, ref in zip(params, ref_grads[1:]):
        assert_close_dtype(p.grad, ref)


def test_no_grad_inputs_record_no_graph(device):
    n, C = 2, 3
    outs = OP(torch.randn(3, n, C, device=device), *_make_params(n, C, device))
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)


# ---------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
    """(id, make(device) -> (x, phi, alpha, bias, scalars dict), message regex)."""

    def valid(n=4, C=8, x_dtype=torch.float32, **changes):
        def make(d):
            x = torch.randn(2, n, C, device=d).to(x_dtype)
            phi, alpha, bias = _make_params(n, C, d)
            parts = dict(x=x, phi=phi, alpha=alpha, bias=bias, scalars={})
            for key, value in changes.items():
                if key in parts:
                    parts[key] = value(d) if callable(value) else value
                else:
                    parts["scalars"][key] = value
            return parts["x"], parts["phi"], parts["alpha"], parts["bias"], parts["scalars"]

        return make

    def randn(*shape, dtype=torch.float32):
        return lambda d: torch.randn(*shape, device=d, dtype=dtype)

    return [
        ("phi-rows", valid(phi=randn(31, 24)), r"phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]"),
        ("phi-cols", valid(phi=randn(32, 23)), r"phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]"),
        ("phi-1d", valid(phi=randn(32 * 24)), r"phi of shape \[n\*C, n\*n\+2n\]"),
        ("phi-transposed", valid(phi=randn(24, 32)), r"phi of shape \[n\*C, n\*n\+2n\]"),
        ("alpha-4", valid(alpha=randn(4)), r"alpha of shape \[3\]"),
        ("alpha-2d", valid(alpha=randn(1, 3)), r"alpha of shape \[3\]"),
        ("alpha-0d", valid(alpha=randn(())), r"alpha of shape \[3\]"),
        ("bias-23", valid(bias=randn(23)), r"bias of shape \[n\*n\+2n\] = \[24\]"),
        ("bias-2d", valid(bias=randn(1, 24)), r"bias of shape \[n\*n\+2n\] = \[24\]"),
        ("phi-bf16", valid(phi=randn(32, 24, dtype=torch.bfloat16)), r"phi of dtype"),
        ("alpha-fp64", valid(alpha=randn(3, dtype=torch.float64)), r"alpha of dtype"),
        ("bias-fp16", valid(bias=randn(24, dtype=torch.float16)), r"bias of dtype"),
        ("fp64-x-fp32-phi", valid(x_dtype=torch.float64), r"phi of dtype"),
        ("x-int", valid(x=lambda d: torch.randint(0, 5, (2, 4, 8), device=d)), r"x of dtype .*got \S*(Long|int64)"),
        ("x-1d", valid(x=randn(8)), r"x of shape \[\.\.\., n, C\] with at least 2 dims"),
        ("n=33", valid(n=33, C=1), r"n = x.size\(-2\) in \[1, 32\], got 33"),
        ("n=0", valid(x=randn(2, 0, 8)), r"n = x.size\(-2\) in \[1, 32\], got 0"),
        ("C=0", valid(x=randn(2, 4, 0), phi=randn(0, 24)), r"C = x.size\(-1\) >= 1, got 0"),
        ("iters=0", valid(sinkhorn_iters=0), r"sinkhorn_iters in \[1, 1048576\], got 0"),
        ("iters=-1", valid(sinkhorn_iters=-1), r"sinkhorn_iters in \[1, 1048576\], got -1"),
        ("sinkhorn_eps<0", valid(sinkhorn_eps=-1e-3), r"sinkhorn_eps finite and >= 0"),
        ("sinkhorn_eps=nan", valid(sinkhorn_eps=math.nan), r"sinkhorn_eps finite and >= 0, got nan"),
        ("norm_eps<0", valid(norm_eps=-1e-6), r"norm_eps finite and >= 0"),
        ("norm_eps=inf", valid(norm_eps=math.inf), r"norm_eps finite and >= 0, got inf"),
        ("pre_eps=nan", valid(pre_eps=math.nan), r"pre_eps finite"),
        ("pre_eps=-inf", valid(pre_eps=-math.inf), r"pre_eps finite"),
        ("post_mult=inf", valid(post_mult=math.inf), r"post_mult finite"),
        ("post_mult=nan", valid(post_mult=math.nan), r"post_mult finite"),
    ]


BAD_CALLS = {case[0]: case[1:] for case in _bad_calls()}
# Cases that mhc_backward checks too (it takes no norm_eps).
BACKWARD_BAD_CALLS = [c for c in BAD_CALLS if not c.startswith("norm_eps")]


@pytest.mark.parametrize("entry", ["op", "fwd_op", "wrapper"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise(device, case, entry):
    make, match = BAD_CALLS[case]
    x, phi, alpha, bias, scalars = make(device)
    fn = {"op": OP, "fwd_op": FWD_OP, "wrapper": hcext.ops.mhc_coeffs}[entry]
    with pytest.raises(RuntimeError, match=r"hcext::mhc_coeffs: .*" + match):
        fn(x, phi, alpha, bias, **scalars)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_in_fake_kernel(case):
    # torch.compile / export see the fake kernel: it must reject the same inputs.
    make, match = BAD_CALLS[case]
    x, phi, alpha, bias, scalars = make("meta")
    with pytest.raises(RuntimeError, match=match):
        OP(x, phi, alpha, bias, **scalars)


def _valid_backward_args(device, n=4, C=8):
    x = torch.randn(3, n, C, device=device)
    return list(_backward_args(x, _make_params(n, C, device), (True, True, True, True)))


@pytest.mark.parametrize("case", BACKWARD_BAD_CALLS)
def test_backward_bad_arguments_raise(device, case):
    make, match = BAD_CALLS[case]
    x, phi, alpha, bias, scalars = make(device)
    lead, n = (x.shape[:-2], x.shape[-2]) if x.dim() >= 2 else ((), 4)
    D = _width(n)
    kw = dict(
        sinkhorn_iters=scalars.get("sinkhorn_iters", 5),
        sinkhorn_eps=scalars.get("sinkhorn_eps", 1e-6),
        pre_eps=scalars.get("pre_eps", 1e-6),
        post_mult=scalars.get("post_mult", 2.0),
    )
    # proj / rstd / grads shaped for x as given
    proj = torch.randn(*lead, D, device=device)
    rstd = torch.rand(lead, device=device)
    g = torch.randn(*lead, n, n, device=device)
    with pytest.raises(RuntimeError, match=r"hcext::mhc_backward: .*" + match):
        BACKWARD_OP(x, phi, alpha, bias, proj, rstd, None, None, None, g, **kw)


def _bad_backward_calls():
    """(id, index of the argument to replace, replacement(device), message regex) for x [3, 4, 8]."""
    return [
        ("proj-cols", 4, lambda d: torch.randn(3, 25, device=d), r"proj of shape \[\.\.\., 24\]"),
        ("proj-tokens", 4, lambda d: torch.randn(4, 24, device=d), r"proj of shape \[\.\.\., 24\]"),
        ("proj-fp64", 4, lambda d: torch.randn(3, 24, device=d, dtype=torch.float64), r"proj of dtype"),
        ("rstd-numel", 5, lambda d: torch.rand(4, device=d), r"rstd with one value per token \(3\)"),
        ("rstd-fp16", 5, lambda d: torch.rand(3, device=d, dtype=torch.float16), r"rstd of dtype"),
        ("grad_layer_input-numel", 6, lambda d: torch.randn(3, 7, device=d), r"grad_layer_input with 24 elements"),
        ("grad_h_pre-numel", 7, lambda d: torch.randn(3, 5, device=d), r"grad_h_pre with 12 elements"),
        ("grad_h_post-numel", 8, lambda d: torch.randn(2, 4, device=d), r"grad_h_post with 12 elements"),
        ("grad_h_res-numel", 9, lambda d: torch.randn(3, 4, 3, device=d), r"grad_h_res with 48 elements"),
        ("grad_h_res-int", 9, lambda d: torch.ones(3, 4, 4, device=d, dtype=torch.int64), r"grad_h_res .*floating"),
    ]


BAD_BACKWARD = {case[0]: case[1:] for case in _bad_backward_calls()}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_bad_saved_or_grads_raise(device, case):
    index, replacement, match = BAD_BACKWARD[case]
    args = _valid_backward_args(device)
    BACKWARD_OP(*args)  # valid as built
    args[index] = replacement(device)
    with pytest.raises(RuntimeError, match=r"hcext::mhc_backward: .*" + match):
        BACKWARD_OP(*args)


@pytest.mark.parametrize("case", ["proj-cols", "rstd-numel", "grad_h_res-numel"])
def test_backward_bad_saved_or_grads_raise_in_fake_kernel(case):
    index, replacement, match = BAD_BACKWARD[case]
    args = _valid_backward_args("meta")
    args[index] = replacement("meta")
    with pytest.raises(RuntimeError, match=match):
        BACKWARD_OP(*args)


# ---------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.parametrize("name", ["phi", "alpha", "bias"])
def test_cuda_parameter_on_cpu_raises(name):
    n, C = 4, 8
    x = torch.randn(3, n, C, device="cuda")
    params = dict(zip(("phi", "alpha", "bias"), _make_params(n, C, "cuda")))
    params[name] = params[name].cpu()
    with pytest.raises(RuntimeError, match=rf"expected {name} on cuda"):
        OP(x, params["phi"], params["alpha"], params["bias"])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,C", [(1, 64), (4, 64), (4, 1280), (5, 7), (16, 32)])
def test_cuda_matches_cpu(n, C, dtype):
    tokens = 300
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x_cpu = torch.randn(tokens, n, C).to(dtype)
    params_cpu = _make_params(n, C, "cpu", pdtype)
    weights_cpu = _output_weights(x_cpu, pdtype)
    gy_cpu = torch.randn(tokens, C, dtype=pdtype)

    results = {}
    for dev in ("cpu", "cuda"):
        x, params, weights = x_cpu.to(dev), [p.to(dev) for p in params_cpu], [w.to(dev) for w in weights_cpu]
        outs, grads = _forward_backward(hcext.ops.mhc_coeffs, x, params, weights, sinkhorn_iters=20)
        _, _, _, proj, rstd = FWD_OP(x, *params, 20)
        fused = BACKWARD_OP(x, *params, proj, rstd, gy_cpu.to(dev), *weights, 20, 1e-6, 1e-6, 2.0)
        results[dev] = (outs, grads, list(fused))
    for out_cpu, out_gpu in zip(results["cpu"][0], results["cuda"][0]):
        assert out_gpu.device.type == "cuda" and out_gpu.dtype == out_cpu.dtype
        assert_close_dtype(out_gpu.cpu(), out_cpu, pdtype)
    # autograd's backward (no layer input), then mhc_backward with one
    for grads_cpu, grads_gpu, gy in ((results["cpu"][1], results["cuda"][1], None),
                                     (results["cpu"][2], results["cuda"][2], gy_cpu)):
        assert grads_gpu[0].dtype == dtype and grads_gpu[0].device.type == "cuda"
        if dtype == torch.bfloat16:  # both round the same fp32 sum once: at most an ulp apart
            assert_close_dtype(grads_gpu[0].cpu(), grads_cpu[0])
        else:
            terms = _grad_x_terms(x_cpu, params_cpu, weights_cpu, grad_layer_input=gy)
            _assert_grad_x_close(grads_gpu[0].cpu(), grads_cpu[0], terms, dtype)
        for g_cpu, g_gpu in zip(grads_cpu[1:], grads_gpu[1:]):
            assert_close_dtype(g_gpu.cpu(), g_cpu, pdtype)


@requires_cuda
def test_cuda_noncontiguous_x_and_empty():
    n, C = 4, 16
    params_cpu = _make_params(n, C, "cpu")
    for x_cpu in (torch.randn(5, C, n).transpose(-1, -2), torch.randn(0, n, C), torch.randn(2, 3, n, C)):
        weights = _output_weights(x_cpu, torch.float32)
        outs_cpu, grads_cpu = _forward_backward(OP, x_cpu, params_cpu, weights)
        outs_gpu, grads_gpu = _forward_backward(
            OP, x_cpu.cuda(), [p.cuda() for p in params_cpu], [w.cuda() for w in weights]
        )
        for a, b in zip(outs_gpu + grads_gpu, outs_cpu + grads_cpu):
            assert_close_dtype(a.cpu(), b)
