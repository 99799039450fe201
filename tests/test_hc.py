"""Tests of the original Hyper-Connections coefficient op against hcext.reference.hc_coeffs:
the public hcext::hc_coeffs, its autograd twin hcext::hc_coeffs_fwd (which also returns the
saved proj and stats) and hcext::hc_coeffs_backward. Values and every gradient over n, both
norms, tanh on/off, static / dynamic (alpha only, beta only, both), norm weight/bias, scales,
leading shapes and strides; bf16/fp16 x; gradcheck; opcheck; what autograd saves;
determinism; torch.compile of a whole HC sub-layer; static HC through the stream ops;
argument errors (real and fake kernels); the HC initialisation (hcext.init) against a
Pre-Norm network; CUDA vs CPU (when a GPU is present).

Tolerances: fp32 / fp64 results are compared with the fp64 reference using the dtype's row
of helpers.TOLERANCES, with the atol scaled by the largest |expected| of the tensor (at
least 1): gradients are sums with cancellation (the norm's backward, sums over tokens and
channels), so their rounding error follows their largest terms, not each element.
bf16 / fp16 x: the op's error vs the fp64 reference (on the same rounded x) is at most twice
the error of the reference run on the low-precision x (fp32 parameters), plus LOWP_ATOL
times the tensor's scale.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference
from helpers import TOLERANCES, requires_cuda

OP = torch.ops.hcext.hc_coeffs.default
FWD_OP = torch.ops.hcext.hc_coeffs_fwd.default
BACKWARD_OP = torch.ops.hcext.hc_coeffs_backward.default

# Optional parameters in schema order (also the order of hc_coeffs_backward's gradients after
# x, static_alpha, static_beta).
OPTIONAL = ("dynamic_alpha", "dynamic_beta", "alpha_scale", "beta_scale", "norm_weight", "norm_bias")
PARAM_NAMES = ("static_alpha", "static_beta") + OPTIONAL
LOWP_ATOL = 1e-5

# Which dynamic weights a case has.
PARTS = {"static": (), "both": ("alpha", "beta"), "alpha-only": ("alpha",), "beta-only": ("beta",)}
# Which affine parameters the per-stream norm has.
AFFINE = {"none": (), "weight": ("weight",), "bias": ("bias",), "weight+bias": ("weight", "bias")}


# ---------------------------------------------------------------------------------------
# Inputs


def make_params(n, C, device, dtype=torch.float32, parts="both", affine="weight", scales=True):
    """Parameters at scales where every term matters: dynamic projections ~ N(0, 1), scales
    in [0.5, 1.5] (0.01 at init would hide the dynamic part), static ~ N(0, 1)."""
    kw = dict(device=device, dtype=dtype)
    p = dict(static_alpha=torch.randn(n, n + 1, **kw), static_beta=torch.randn(n, **kw))
    if "alpha" in PARTS[parts]:
        p["dynamic_alpha"] = torch.randn(C, n + 1, **kw) / C**0.5
    if "beta" in PARTS[parts]:
        p["dynamic_beta"] = torch.randn(C, **kw) / C**0.5
    if scales:
        p["alpha_scale"] = torch.empty((), **kw).uniform_(0.5, 1.5)
        p["beta_scale"] = torch.empty((), **kw).uniform_(0.5, 1.5)
    if "weight" in AFFINE[affine]:
        p["norm_weight"] = 1 + 0.5 * torch.randn(C, **kw)
    if "bias" in AFFINE[affine]:
        p["norm_bias"] = 0.5 * torch.randn(C, **kw)
    return p


# name -> x of shape [..., n, C], possibly a non-contiguous view
LAYOUTS = {
    "lead=()": lambda n, C, **kw: torch.randn(n, C, **kw),
    "lead=(0,)": lambda n, C, **kw: torch.randn(0, n, C, **kw),
    "lead=(5,)": lambda n, C, **kw: torch.randn(5, n, C, **kw),
    "lead=(2,3)": lambda n, C, **kw: torch.randn(2, 3, n, C, **kw),
    # tokens not outermost in memory: [n, 5, C] seen as [5, n, C]
    "tokens-strided": lambda n, C, **kw: torch.randn(n, 5, C, **kw).transpose(0, 1),
    # channels outermost: [5, C, n] seen as [5, n, C]
    "streams-transposed": lambda n, C, **kw: torch.randn(5, C, n, **kw).transpose(-1, -2),
    # every other channel of [5, n, 2C]
    "sliced": lambda n, C, **kw: torch.randn(5, n, 2 * C, **kw)[..., ::2],
}
NONCONTIGUOUS = {"tokens-strided", "streams-transposed", "sliced"}


def output_weights(x, dynamic, dtype):
    """Random weights w_k for the loss sum_k sum(w_k * out_k), in the outputs' shapes."""
    lead = x.shape[:-2] if dynamic else ()
    n = x.shape[-2]
    return [torch.randn(*lead, *tail, device=x.device, dtype=dtype) for tail in ((n,), (n,), (n, n))]


def forward_backward(fn, x, params, weights, **kwargs):
    """(outputs, {name: grad}) of sum_k sum(w_k * fn(x, **params)_k) for fresh leaves.
    Inputs the outputs do not depend on get zero gradients."""
    x = x.detach().requires_grad_(True)  # detach keeps x's strides
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    outs = fn(x, **leaves, **kwargs)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, [x, *leaves.values()], allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], dict(zip(["x", *leaves], grads))


def to64(params):
    return {k: v.detach().double() for k, v in params.items()}


def assert_scaled_close(actual, expected, dtype, name):
    """expected's dtype row of TOLERANCES, atol scaled by max(1, max|expected|)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}"
    )


def check_against_reference(x, params, dtype, **kwargs):
    """The op (through autograd) vs the fp64 reference: every output and every gradient."""
    dynamic = "dynamic_alpha" in params or "dynamic_beta" in params
    weights = output_weights(x, dynamic, dtype)
    outs, grads = forward_backward(hcext.ops.hc_coeffs, x, params, weights, **kwargs)
    ref_outs, ref_grads = forward_backward(
        reference.hc_coeffs, x.detach().double(), to64(params), [w.double() for w in weights], **kwargs
    )
    lead, n = (x.shape[:-2] if dynamic else ()), x.shape[-2]
    for name, out, ref, tail in zip(("h_pre", "h_post", "h_res"), outs, ref_outs, ((n,), (n,), (n, n))):
        assert out.dtype == dtype and out.device == x.device, name
        assert out.shape == (*lead, *tail), name
        assert out.is_contiguous(), name
        assert_scaled_close(out, ref, dtype, name)
    assert grads["x"].dtype == x.dtype and grads["x"].shape == x.shape
    for name, g in grads.items():
        assert g.dtype == (x.dtype if name == "x" else params[name].dtype), name
        assert_scaled_close(g, ref_grads[name], dtype, f"grad_{name}")
    return outs, grads


# ---------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.parametrize("parts", list(PARTS))
@pytest.mark.parametrize("use_tanh", [True, False], ids=["tanh", "no-tanh"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_matches_reference(device, n, norm, use_tanh, parts):
    C = 24
    # cycle through the norm's affine variants so that every combination with n is covered
    affine = list(AFFINE)[(n + len(parts) + use_tanh) % len(AFFINE)]
    x = torch.randn(6, n, C, device=device)
    check_against_reference(x, make_params(n, C, device, parts=parts, affine=affine), torch.float32, norm=norm,
                            use_tanh=use_tanh)


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("parts", ["both", "alpha-only", "beta-only"])
def test_matches_reference_norm_affine(device, parts, norm, affine):
    n, C = 4, 40
    x = torch.randn(7, n, C, device=device)
    check_against_reference(x, make_params(n, C, device, parts=parts, affine=affine), torch.float32, norm=norm)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n", [1, 4])
def test_matches_reference_layouts(device, n, norm, layout):
    C = 16
    x = LAYOUTS[layout](n, C, device=device)
    if layout in NONCONTIGUOUS and n > 1:
        assert not x.is_contiguous()  # the case tests what it says
    check_against_reference(x, make_params(n, C, device, affine="weight+bias"), torch.float32, norm=norm)


@pytest.mark.parametrize("layout", ["lead=(5,)", "lead=(0,)", "streams-transposed", "lead=(2,3)"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n,C", [(1, 3), (3, 7), (4, 64), (8, 5)])
def test_matches_reference_fp64(device, n, C, norm, layout):
    x = LAYOUTS[layout](n, C, device=device, dtype=torch.float64)
    params = make_params(n, C, device, torch.float64, affine="weight+bias")
    check_against_reference(x, params, torch.float64, norm=norm, use_tanh=(n % 2 == 0))


@pytest.mark.parametrize("C", [1, 2, 1280])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_matches_reference_channels(device, norm, C):
    # C = 1: LayerNorm maps every stream to its bias (var = 0, x - mean = 0); C = 1280: a real width.
    n = 4
    x = torch.randn(5, n, C, device=device)
    check_against_reference(x, make_params(n, C, device, affine="weight+bias"), torch.float32, norm=norm)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_many_tokens_chunked_reduction(device, norm):
    # More tokens than one chunk of the (deterministic, chunked) parameter-gradient reduction.
    n, C = 4, 8
    x = torch.randn(2100, n, C, device=device)
    check_against_reference(x, make_params(n, C, device, affine="weight+bias"), torch.float32, norm=norm)


def test_scales_and_eps(device):
    n, C = 4, 12
    x = torch.randn(5, n, C, device=device) * 3 + 1  # a non-zero mean: LayerNorm's centring matters
    for scales in (False, True):
        for eps in (1e-6, 0.5):  # a large eps changes rstd, and its gradient
            params = make_params(n, C, device, affine="weight+bias", scales=scales)
            for norm in ("rms", "layer"):
                check_against_reference(x, params, torch.float32, norm=norm, norm_eps=eps)


def test_scales_of_absent_dynamic_parts_are_ignored(device):
    # alpha_scale without dynamic_alpha (and beta_scale without dynamic_beta) changes nothing
    # and gets a zero gradient, as in the reference.
    n, C = 3, 8
    x = torch.randn(4, n, C, device=device)
    for parts, unused in (("beta-only", "alpha_scale"), ("alpha-only", "beta_scale")):
        params = make_params(n, C, device, parts=parts)
        outs, grads = check_against_reference(x, params, torch.float32)
        assert (grads[unused] == 0).all()
        without = {k: v for k, v in params.items() if k != unused}
        for a, b in zip(outs, OP(x, **without)):
            assert torch.equal(a, b)


def test_large_mean_layer_norm(device):
    # Streams with |mean| = 1e4 std: fp32 x itself keeps only ~3 digits of the deviations, so
    # the bound is the low-precision rule against the reference run in fp32 (whose F.layer_norm
    # is two-pass); the shifted one-pass statistics must not add error beyond it.
    n, C = 4, 64
    x = 100.0 + 0.01 * torch.randn(6, n, C, device=device)
    params = make_params(n, C, device, affine="weight+bias")
    weights = output_weights(x, True, torch.float32)
    outs, grads = forward_backward(hcext.ops.hc_coeffs, x, params, weights, norm="layer")
    f32_outs, f32_grads = forward_backward(reference.hc_coeffs, x, params, weights, norm="layer")
    ref_outs, ref_grads = forward_backward(
        reference.hc_coeffs, x.double(), to64(params), [w.double() for w in weights], norm="layer"
    )
    for name, out, ref, f32 in zip(("h_pre", "h_post", "h_res"), outs, ref_outs, f32_outs):
        _assert_within_twice_reference_error(name, out, ref, f32)
    for name in grads:
        _assert_within_twice_reference_error(f"grad_{name}", grads[name], ref_grads[name], f32_grads[name])


def test_zero_stream(device):
    # An all-zero stream: rstd = 1/sqrt(eps), H̄ = norm_bias; finite values and gradients.
    n, C = 4, 16
    x = torch.randn(5, n, C, device=device)
    x[2, 1] = 0
    for norm in ("rms", "layer"):
        outs, grads = check_against_reference(x, make_params(n, C, device, affine="weight+bias"), torch.float32,
                                              norm=norm)
        assert all(torch.isfinite(t).all() for t in [*outs, *grads.values()])


def test_static_outputs_are_shared_copies(device):
    # Static HC: [n], [n], [n, n] in hcext's convention, copies (not views) of the parameters,
    # and no per-token work (the forward op's saved tensors are empty).
    n, C = 4, 8
    params = make_params(n, C, device, parts="static")
    x = torch.randn(2, 3, n, C, device=device)
    h_pre, h_post, h_res, proj, stats = FWD_OP(x, params["static_alpha"], params["static_beta"])
    assert torch.equal(h_pre, params["static_alpha"][:, 0])
    assert torch.equal(h_post, params["static_beta"])
    assert torch.equal(h_res, params["static_alpha"][:, 1:].t())
    assert proj.numel() == 0 and stats.numel() == 0
    for out in (h_pre, h_post, h_res):
        assert out.is_contiguous()
        assert out.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in params.values()}


def test_forward_op_returns_proj_and_stats(device):
    # The saved intermediates: proj = Σ_c (x - mean) (w ⊙ W) per stream, stats = (mean, rstd).
    n, C = 3, 10
    x = torch.randn(2, 4, n, C, device=device) + 0.5
    params = make_params(n, C, device, affine="weight+bias")
    for norm in ("rms", "layer"):
        outs = FWD_OP(x, **params, norm=norm, norm_eps=1e-3)
        proj, stats = outs[3], outs[4]
        xd = x.double()
        mean = xd.mean(-1) if norm == "layer" else torch.zeros_like(xd[..., 0])
        var = xd.var(-1, unbiased=False) if norm == "layer" else xd.pow(2).mean(-1)
        W = torch.cat([params["dynamic_alpha"], params["dynamic_beta"][:, None]], 1).double()
        want_proj = (xd - mean[..., None]) @ (W * params["norm_weight"].double()[:, None])
        assert proj.shape == (2, 4, n, n + 2) and stats.shape == (2, 4, n, 2)
        assert_scaled_close(proj, want_proj, torch.float32, "proj")
        assert_scaled_close(stats[..., 0], mean, torch.float32, "mean")
        assert_scaled_close(stats[..., 1], torch.rsqrt(var + 1e-3), torch.float32, "rstd")
        for a, b in zip(outs[:3], OP(x, **params, norm=norm, norm_eps=1e-3)):
            assert torch.equal(a, b)
        assert not proj.requires_grad and not stats.requires_grad


def test_init_values_make_identity_coefficients(device):
    # At hcext.init's values, dynamic HC equals static HC: h_pre = e_k, h_post = 1, h_res = I.
    n, C = 4, 8
    x = torch.randn(5, n, C, device=device)
    for k in range(6):
        p = hcext.init.hc_dynamic(n, C, k, device=device)
        h_pre, h_post, h_res = OP(x, **p)
        assert torch.equal(h_pre, F.one_hot(torch.tensor(k % n), n).float().to(device).expand(5, n))
        assert torch.equal(h_post, torch.ones(5, n, device=device))
        assert torch.equal(h_res, torch.eye(n, device=device).expand(5, n, n))


# ---------------------------------------------------------------------------------------
# bf16 / fp16 x: fp32 coefficients, gradient in x's dtype


def _assert_within_twice_reference_error(name, actual, ref64, ref_lowp):
    if actual.numel() == 0:
        return
    err = (actual.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    assert err <= 2 * ref_err + LOWP_ATOL * scale, (
        f"{name}: error {err:.3e} vs the low-precision reference's {ref_err:.3e}"
    )


@pytest.mark.parametrize("parts", ["both", "beta-only"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x(device, dtype, norm, parts):
    n, C = 4, 64
    x = torch.randn(9, n, C, device=device).to(dtype)
    params = make_params(n, C, device, parts=parts, affine="weight+bias")
    weights = output_weights(x, True, torch.float32)
    outs, grads = forward_backward(hcext.ops.hc_coeffs, x, params, weights, norm=norm)
    low_outs, low_grads = forward_backward(reference.hc_coeffs, x, params, weights, norm=norm)
    ref_outs, ref_grads = forward_backward(
        reference.hc_coeffs, x.double(), to64(params), [w.double() for w in weights], norm=norm
    )
    assert all(o.dtype == torch.float32 for o in outs)
    assert grads["x"].dtype == dtype and all(g.dtype == torch.float32 for k, g in grads.items() if k != "x")
    for name, out, ref, low in zip(("h_pre", "h_post", "h_res"), outs, ref_outs, low_outs):
        _assert_within_twice_reference_error(name, out, ref, low)
    for name in grads:
        _assert_within_twice_reference_error(f"grad_{name}", grads[name], ref_grads[name], low_grads[name])


# ---------------------------------------------------------------------------------------
# gradcheck (fp64): x and every parameter together


@pytest.mark.parametrize(
    "norm,use_tanh,parts,affine",
    [
        ("rms", True, "both", "weight+bias"),
        ("layer", True, "both", "weight+bias"),
        ("layer", False, "alpha-only", "weight"),
        ("rms", False, "beta-only", "bias"),
        ("layer", True, "beta-only", "none"),
        ("rms", True, "static", "none"),
    ],
)
def test_gradcheck(device, norm, use_tanh, parts, affine):
    n, C = 3, 4
    base = torch.randn(2, C, n, device=device, dtype=torch.float64, requires_grad=True)  # non-contiguous view below
    params = make_params(n, C, device, torch.float64, parts=parts, affine=affine)
    names = list(params)
    leaves = [params[k].requires_grad_(True) for k in names]

    def fn(b, *values):
        return hcext.ops.hc_coeffs(b.transpose(-1, -2), **dict(zip(names, values)), norm=norm, norm_eps=1e-2,
                                   use_tanh=use_tanh)

    assert torch.autograd.gradcheck(fn, (base, *leaves))


# ---------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensor, aot dispatch with dynamic shapes)


def _samples(device):
    """(name, args, kwargs) samples for hcext::hc_coeffs and hcext::hc_coeffs_fwd."""

    def sample(x, parts="both", affine="weight", dtype=torch.float32, **kwargs):
        p = make_params(x.shape[-2], x.shape[-1], device, dtype, parts=parts, affine=affine)
        args = (x, p.pop("static_alpha"), p.pop("static_beta"))
        return args, dict(p, **kwargs)

    yield "static", sample(torch.randn(3, 4, 8, device=device), parts="static")
    yield "rms", sample(torch.randn(6, 4, 8, device=device))
    yield "layer+bias-no-tanh", sample(torch.randn(6, 4, 8, device=device), affine="weight+bias", norm="layer",
                                       use_tanh=False)
    yield "alpha-only", sample(torch.randn(2, 3, 2, 5, device=device), parts="alpha-only", affine="none")
    yield "beta-only", sample(torch.randn(6, 4, 8, device=device), parts="beta-only", norm="layer")
    yield "bf16", sample(torch.randn(5, 4, 8, device=device).to(torch.bfloat16), norm="layer")
    yield "fp64", sample(torch.randn(2, 3, 5, device=device, dtype=torch.float64), dtype=torch.float64)
    yield "empty", sample(torch.randn(0, 4, 8, device=device))
    yield "noncontiguous", sample(torch.randn(6, 8, 3, device=device).transpose(-1, -2), affine="bias")


SAMPLES = [name for name, _ in _samples("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("op", [OP, FWD_OP], ids=["hc_coeffs", "hc_coeffs_fwd"])
def test_opcheck_forward(device, op, sample, requires_grad):
    args, kwargs = dict(_samples(device))[sample]
    if requires_grad:
        args = tuple(a.detach().requires_grad_(True) for a in args)
        kwargs = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    torch.library.opcheck(op, args, kwargs)


def _backward_args(x, params, norm="rms", use_tanh=True, grads=(True, True, True), mask=(True,) * 9):
    """Positional arguments of hc_coeffs_backward for x and params (dynamic), random incoming gradients."""
    outs = FWD_OP(x, **params, norm=norm, use_tanh=use_tanh)
    incoming = [torch.randn_like(o) if g else None for o, g in zip(outs[:3], grads)]
    optional = [params.get(k) for k in OPTIONAL]
    return (x, params["static_alpha"], params["static_beta"], *optional, outs[3], outs[4], *incoming, norm, use_tanh,
            list(mask))


BACKWARD_SAMPLES = {
    "all": {},
    "layer-no-tanh": dict(norm="layer", use_tanh=False),
    "res-grad-only": dict(grads=(False, False, True)),
    "no-grads": dict(grads=(False, False, False)),
    "mask-x-only": dict(mask=(True,) + (False,) * 8),
    "mask-params-only": dict(mask=(False,) + (True,) * 8),
}


@pytest.mark.parametrize("sample", [*BACKWARD_SAMPLES, "alpha-only", "bf16", "fp64", "empty", "noncontiguous"])
def test_opcheck_backward(device, sample):
    n, C, dtype, parts = 4, 8, torch.float32, "both"
    x = torch.randn(3, n, C, device=device)
    if sample == "bf16":
        x = x.to(torch.bfloat16)
    elif sample == "fp64":
        x, dtype = x.double(), torch.float64
    elif sample == "empty":
        x = x[:0]
    elif sample == "noncontiguous":
        x = torch.randn(3, C, n, device=device).transpose(-1, -2)
    elif sample == "alpha-only":
        parts = "alpha-only"
    params = make_params(n, C, device, dtype, parts=parts, affine="weight+bias")
    torch.library.opcheck(BACKWARD_OP, _backward_args(x, params, **BACKWARD_SAMPLES.get(sample, {})))


# ---------------------------------------------------------------------------------------
# hc_coeffs_backward: optional gradients, output_mask, and autograd's use of it


def test_backward_none_equals_zeros_and_mask_selects(device):
    n, C = 4, 16
    x = torch.randn(6, n, C, device=device)
    params = make_params(n, C, device, affine="weight+bias")
    args = list(_backward_args(x, params, norm="layer", grads=(True, False, True)))
    full = BACKWARD_OP(*args)
    args_zeros = list(args)
    args_zeros[12] = torch.zeros(6, n, device=device)  # grad_h_post: None -> zeros
    for a, b in zip(full, BACKWARD_OP(*args_zeros)):
        torch.testing.assert_close(a, b)
    assert [tuple(g.shape) for g in full] == [tuple(x.shape), (n, n + 1), (n,), (C, n + 1), (C,), (), (), (C,), (C,)]
    for k in range(9):  # one gradient at a time: the same values, the others empty
        mask = [j == k for j in range(9)]
        one = BACKWARD_OP(*args[:-1], mask)
        for j, g in enumerate(one):
            if j == k:
                assert torch.equal(g, full[j])
            else:
                assert g.shape == (0,)
    args[11:14] = [None, None, None]
    assert all((g == 0).all() for g in BACKWARD_OP(*args))


def test_backward_absent_inputs_get_empty_gradients(device):
    n, C = 3, 5
    x = torch.randn(4, n, C, device=device)
    params = make_params(n, C, device, parts="beta-only", affine="none", scales=False)
    grads = BACKWARD_OP(*_backward_args(x, params))
    for name, g in zip(PARAM_NAMES, grads[1:]):
        assert (g.numel() == 0) == (name not in params), name


def test_autograd_uses_backward_op(device):
    n, C = 3, 9
    x = torch.randn(4, n, C, device=device)
    params = make_params(n, C, device, affine="weight+bias")
    weights = output_weights(x, True, torch.float32)
    _, grads = forward_backward(hcext.ops.hc_coeffs, x, params, weights, norm="layer")
    args = list(_backward_args(x, params, norm="layer"))
    args[11:14] = weights
    direct = BACKWARD_OP(*args)
    for name, g in zip(["x", *PARAM_NAMES], direct):
        assert torch.equal(grads[name], g), name


def test_no_grad_inputs_record_no_graph(device):
    n, C = 2, 3
    outs = OP(torch.randn(3, n, C, device=device), **make_params(n, C, device))
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)


# ---------------------------------------------------------------------------------------
# Memory: autograd keeps the inputs, proj and stats only


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_autograd_saves_only_proj_and_stats(device, norm):
    T, n, C = 16, 4, 64
    x = torch.randn(T, n, C, device=device).to(torch.bfloat16).requires_grad_(True)
    params = {k: v.requires_grad_(True) for k, v in make_params(n, C, device, affine="weight+bias").items()}
    inputs = {t.data_ptr() for t in (x, *params.values())}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = hcext.ops.hc_coeffs(x, **params, norm=norm)
    extra = [t for t in saved if t.data_ptr() not in inputs]
    description = [(tuple(t.shape), t.dtype) for t in extra]
    # proj [T, n, n+2] and stats [T, n, 2] in fp32: O(tokens * n * (n+2)), never [..., n, C]
    assert sum(t.numel() * t.element_size() for t in extra) == T * n * (n + 2) * 4 + T * n * 2 * 4, description
    assert all(t.dtype == torch.float32 and t.shape[-1] != C for t in extra), description
    # and they suffice for a correct backward
    weights = output_weights(x, True, torch.float32)
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    _, ref_grads = forward_backward(reference.hc_coeffs, x, params, weights, norm=norm)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, ref_grads["x"], **TOLERANCES[torch.bfloat16])
    for name, p in params.items():
        assert_scaled_close(p.grad, ref_grads[name], torch.float32, name)


def test_static_saves_nothing(device):
    n, C = 4, 8
    x = torch.randn(5, n, C, device=device, requires_grad=True)
    params = {k: v.requires_grad_(True) for k, v in make_params(n, C, device, parts="static").items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = hcext.ops.hc_coeffs(x, **params)
    assert saved == []
    assert all(o.requires_grad for o in outs)


def test_deterministic_and_thread_count_independent():
    # CPU: the same bits run after run and with 1 or 2 threads (fixed-order reductions).
    n, C = 4, 8
    x = torch.randn(1500, n, C)
    params = make_params(n, C, "cpu", affine="weight+bias")
    weights = output_weights(x, True, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (threads, threads, 1):
            torch.set_num_threads(t)
            results.append(forward_backward(hcext.ops.hc_coeffs, x, params, weights, norm="layer"))
    finally:
        torch.set_num_threads(threads)
    for outs, grads in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs, results[0][0]))
        assert all(torch.equal(grads[k], results[0][1][k]) for k in grads)


# ---------------------------------------------------------------------------------------
# A whole HC sub-layer: hc_coeffs -> stream_aggregate -> branch -> stream_mix_expand


def hc_sublayer(x, weight, params, norm="rms"):
    h_pre, h_post, h_res = hcext.ops.hc_coeffs(x, **params, norm=norm)
    f = F.linear(hcext.ops.stream_aggregate(x, h_pre), weight)
    return hcext.ops.stream_mix_expand(f, x, h_post, h_res)


def reference_sublayer(x, weight, params, norm="rms"):
    h_pre, h_post, h_res = reference.hc_coeffs(x, **params, norm=norm)
    f = F.linear(reference.stream_aggregate(x, h_pre), weight)
    return reference.stream_mix_expand(f, x, h_post, h_res)


def run_sublayer(fn, x, weight, params, norm="rms", dynamic_tokens=False):
    """(output, {name: grad}) for fresh leaves; the loss weights are fixed by the output's size.
    ``dynamic_tokens``: mark the leaf x's token dim dynamic for torch.compile."""
    x = x.detach().clone().requires_grad_(True)
    if dynamic_tokens:
        torch._dynamo.mark_dynamic(x, 0)
    weight = weight.detach().clone().requires_grad_(True)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    out = fn(x, weight, leaves, norm)
    w = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    names = ["x", "weight", *leaves]
    grads = torch.autograd.grad((out * w).sum(), [x, weight, *leaves.values()], allow_unused=True,
                                materialize_grads=True)
    return out.detach(), dict(zip(names, grads))


def sublayer_inputs(tokens, n=4, C=16, device="cpu", parts="both"):
    x = torch.randn(tokens, n, C, device=device)
    return x, torch.randn(C, C, device=device) / C**0.5, make_params(n, C, device, parts=parts, affine="weight+bias")


@pytest.mark.parametrize("parts", ["static", "both", "alpha-only"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_sublayer_matches_reference(device, norm, parts):
    # Static HC goes through the stream ops with shared [n] / [n, n] coefficients; their
    # gradients are summed over tokens by the stream ops' backward.
    x, weight, params = sublayer_inputs(9, device=device, parts=parts)
    out, grads = run_sublayer(hc_sublayer, x, weight, params, norm)
    want, want_grads = run_sublayer(reference_sublayer, x, weight, params, norm)
    assert_scaled_close(out, want, torch.float32, "out")
    for name in grads:
        assert_scaled_close(grads[name], want_grads[name], torch.float32, f"grad_{name}")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_compiled_equals_eager(compiled, x, weight, params, norm, dynamic_tokens=False):
    out, grads = run_sublayer(compiled, x, weight, params, norm, dynamic_tokens)
    want, want_grads = run_sublayer(hc_sublayer, x, weight, params, norm)
    torch.testing.assert_close(out, want)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], msg=lambda m, name=name: f"grad_{name}: {m}")


@pytest.mark.parametrize("parts,norm", [("both", "layer"), ("static", "rms"), ("beta-only", "rms")])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_matches_eager(device, fresh_dynamo, backend, parts, norm):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(hc_sublayer, backend=counter, fullgraph=True)
    _assert_compiled_equals_eager(compiled, *sublayer_inputs(6, device=device, parts=parts), norm)
    assert counter.frame_count == 1


def test_compile_dynamic_tokens_do_not_recompile(device, fresh_dynamo):
    # Token counts unlike every other size in the call (n = 4, n + 1 = 5, C = 16): duck
    # sizing would tie equal sizes to one symbol. Only the token dim is marked dynamic.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(hc_sublayer, backend=counter, fullgraph=True)
    x, weight, params = sublayer_inputs(6, device=device)
    _assert_compiled_equals_eager(compiled, x, weight, params, "layer", dynamic_tokens=True)
    assert counter.frame_count == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        for tokens in (11, 17, 29):
            x = torch.randn(tokens, 4, 16, device=device)
            _assert_compiled_equals_eager(compiled, x, weight, params, "layer")
    assert counter.frame_count == 1


def test_compile_inductor(device, fresh_dynamo):
    # Kept tiny (inductor compiles take a while on small CI machines).
    compiled = torch.compile(hc_sublayer, backend="inductor", fullgraph=True)
    _assert_compiled_equals_eager(compiled, *sublayer_inputs(6, n=2, C=4, device=device), "rms")


# ---------------------------------------------------------------------------------------
# Initialisation (HC §2.3, Alg. 2): a network of HC sub-layers equals Pre-Norm at init


def test_init_helpers():
    p = hcext.init.hc_static(4, 6)
    assert torch.equal(p["static_alpha"], torch.tensor([[0.0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 0, 0, 1, 0],
                                                        [0, 0, 0, 0, 1]]))
    assert torch.equal(p["static_beta"], torch.ones(4))
    d = hcext.init.hc_dynamic(2, 5, 1, dtype=torch.float64, norm_bias=True)
    assert sorted(d) == sorted(PARAM_NAMES)
    assert torch.equal(d["static_alpha"], torch.tensor([[0.0, 1, 0], [1, 0, 1]], dtype=torch.float64))
    assert d["dynamic_alpha"].shape == (5, 3) and not d["dynamic_alpha"].any()
    assert d["dynamic_beta"].shape == (5,) and not d["dynamic_beta"].any()
    assert d["alpha_scale"].shape == () and d["alpha_scale"].item() == pytest.approx(0.01)
    assert d["beta_scale"].shape == () and d["beta_scale"].item() == pytest.approx(0.01)
    assert torch.equal(d["norm_weight"], torch.ones(5, dtype=torch.float64))
    assert not d["norm_bias"].any()
    assert all(t.dtype == torch.float64 for t in d.values())
    assert "norm_bias" not in hcext.init.hc_dynamic(2, 5, 1)
    with pytest.raises(ValueError, match="n in"):
        hcext.init.hc_static(0, 0)


class _Branch(torch.nn.Module):
    """An attention-free sub-layer T: RMSNorm -> Linear -> GELU -> Linear (its own pre-norm inside)."""

    def __init__(self, C):
        super().__init__()
        self.norm = torch.nn.RMSNorm(C, eps=1e-6)
        self.up = torch.nn.Linear(C, 2 * C)
        self.down = torch.nn.Linear(2 * C, C)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, h):
        return self.down(F.gelu(self.up(self.norm(h))))


@pytest.mark.parametrize("kind", ["static", "dynamic-rms", "dynamic-layer"])
def test_hc_network_at_init_equals_pre_norm(device, kind):
    """A 2-layer network of 4 sub-layers with HC (n = 4) at hcext.init's values vs the plain
    Pre-Norm residual network with the same branch weights.

    HC §2.3: the input is copied into the n streams; sub-layer k reads stream k mod n
    (A_m = e_k), keeps every stream (A_r = I) and adds its output to every stream (B = 1);
    dynamic HC adds s·tanh(0) = 0. So every stream stays *exactly* the Pre-Norm residual
    stream h_l. At the output the paper sums the n streams (reference.reduce_streams),
    which gives n·h_L, not h_L: the exact relationship is sum = n × (Pre-Norm's last hidden
    state). The final norm removes the factor n up to its eps (RMSNorm(n·h) = RMSNorm(h)
    when eps = 0), so the network outputs agree to fp32 rounding.
    """
    n, C, tokens, sublayers = 4, 16, 6, 4
    branches = torch.nn.ModuleList(_Branch(C) for _ in range(sublayers)).to(device)
    final_norm = torch.nn.RMSNorm(C, eps=1e-6).to(device)
    emb = torch.randn(tokens, C, device=device)

    h = emb
    for branch in branches:
        h = h + branch(h)  # Pre-Norm: the branch normalises its own input
    plain_out = final_norm(h)

    H = reference.expand_streams(emb, n)
    for k, branch in enumerate(branches):
        if kind == "static":
            params, norm = hcext.init.hc_static(n, k, device=device), "rms"
        else:
            params, norm = hcext.init.hc_dynamic(n, C, k, device=device), kind.split("-")[1]
        h_pre, h_post, h_res = hcext.ops.hc_coeffs(H, **params, norm=norm)
        f = branch(hcext.ops.stream_aggregate(H, h_pre))
        H = hcext.ops.stream_mix_expand(f, H, h_post, h_res)
    for i in range(n):
        assert torch.equal(H[:, i], h), f"stream {i} differs from the Pre-Norm residual stream"
    summed = reference.reduce_streams(H)
    torch.testing.assert_close(summed, n * h, rtol=1e-6, atol=0)
    torch.testing.assert_close(final_norm(summed), plain_out)


# ---------------------------------------------------------------------------------------
# Argument errors: a RuntimeError that names the offending argument


def _bad_calls():
    """(id, make(device) -> (x, params dict, kwargs), message regex) with x [2, 4, 8] unless changed."""

    def valid(n=4, C=8, x_dtype=torch.float32, parts="both", **changes):
        def make(d):
            x = torch.randn(2, n, C, device=d).to(x_dtype)
            params = make_params(n, C, d, parts=parts, affine="weight+bias")
            kwargs = {}
            for key, value in changes.items():
                if key == "x":
                    x = value(d)
                elif key in PARAM_NAMES:
                    params[key] = value(d)
                else:
                    kwargs[key] = value
            return x, params, kwargs

        return make

    def randn(*shape, dtype=torch.float32):
        return lambda d: torch.randn(shape, device=d, dtype=dtype)

    return [
        ("static_alpha-square", valid(static_alpha=randn(4, 4)), r"static_alpha of shape \[n, n\+1\] = \[4, 5\]"),
        ("static_alpha-n-mismatch", valid(static_alpha=randn(3, 4)), r"static_alpha of shape \[n, n\+1\] = \[4, 5\]"),
        ("static_alpha-static-hc", valid(parts="static", static_alpha=randn(5, 6)), r"static_alpha of shape"),
        ("static_beta-n-mismatch", valid(static_beta=randn(5)), r"static_beta of shape \[n\] = \[4\]"),
        ("static_beta-2d", valid(static_beta=randn(1, 4)), r"static_beta of shape \[n\] = \[4\]"),
        ("dynamic_alpha-cols", valid(dynamic_alpha=randn(8, 4)), r"dynamic_alpha of shape \[C, n\+1\] = \[8, 5\]"),
        ("dynamic_alpha-rows", valid(dynamic_alpha=randn(9, 5)), r"dynamic_alpha of shape \[C, n\+1\] = \[8, 5\]"),
        ("dynamic_beta-C", valid(dynamic_beta=randn(7)), r"dynamic_beta of shape \[C\] = \[8\]"),
        ("dynamic_beta-2d", valid(dynamic_beta=randn(8, 1)), r"dynamic_beta of shape \[C\] = \[8\]"),
        ("alpha_scale-1d", valid(alpha_scale=randn(1)), r"alpha_scale of shape \[\] \(0-dim\)"),
        ("beta_scale-1d", valid(beta_scale=randn(2)), r"beta_scale of shape \[\] \(0-dim\)"),
        ("norm_weight-C", valid(norm_weight=randn(9)), r"norm_weight of shape \[C\] = \[8\]"),
        ("norm_bias-C", valid(norm_bias=randn(4)), r"norm_bias of shape \[C\] = \[8\]"),
        ("unknown-norm", valid(norm="batch"), r'norm to be "rms" or "layer", got "batch"'),
        ("unknown-norm-static", valid(parts="static", norm="RMS"), r'norm to be "rms" or "layer", got "RMS"'),
        ("static_alpha-fp64", valid(static_alpha=randn(4, 5, dtype=torch.float64)), r"static_alpha of dtype"),
        ("dynamic_alpha-bf16", valid(dynamic_alpha=randn(8, 5, dtype=torch.bfloat16)), r"dynamic_alpha of dtype"),
        ("alpha_scale-fp16", valid(alpha_scale=randn(dtype=torch.float16)), r"alpha_scale of dtype"),
        ("norm_weight-fp64", valid(norm_weight=randn(8, dtype=torch.float64)), r"norm_weight of dtype"),
        ("fp64-x-fp32-params", valid(x_dtype=torch.float64), r"static_alpha of dtype"),
        ("x-int", valid(x=lambda d: torch.randint(0, 5, (2, 4, 8), device=d)), r"x of dtype .*got \S*(Long|int64)"),
        ("x-1d", valid(x=randn(8)), r"x of shape \[\.\.\., n, C\] with at least 2 dims"),
        ("n=33", valid(n=33, C=1), r"n = x.size\(-2\) in \[1, 32\], got 33"),
        ("n=0", valid(x=randn(2, 0, 8)), r"n = x.size\(-2\) in \[1, 32\], got 0"),
        ("C=0", valid(x=randn(2, 4, 0)), r"C = x.size\(-1\) >= 1, got 0"),
        ("norm_eps<0", valid(norm_eps=-1e-6), r"norm_eps finite and >= 0"),
        ("norm_eps=nan", valid(norm_eps=float("nan")), r"norm_eps finite and >= 0, got nan"),
    ]


BAD_CALLS = {case[0]: case[1:] for case in _bad_calls()}


@pytest.mark.parametrize("entry", ["op", "fwd_op", "wrapper"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise(device, case, entry):
    make, match = BAD_CALLS[case]
    x, params, kwargs = make(device)
    fn = {"op": OP, "fwd_op": FWD_OP, "wrapper": hcext.ops.hc_coeffs}[entry]
    with pytest.raises(RuntimeError, match=r"hcext::hc_coeffs: .*" + match):
        fn(x, **params, **kwargs)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_in_fake_kernel(case):
    # torch.compile / export see the fake kernel: it rejects the same inputs, with the same words.
    make, match = BAD_CALLS[case]
    x, params, kwargs = make("meta")
    with pytest.raises(RuntimeError, match=r"hcext::hc_coeffs: .*" + match):
        OP(x, **params, **kwargs)


def _bad_backward_calls():
    """(id, index of the argument to replace, replacement(device), message regex) for x [3, 4, 8]."""
    return [
        ("proj-K", 9, lambda d: torch.randn(3, 4, 5, device=d), r"proj of shape \[\.\.\., n, K\] = \[\.\.\., 4, 6\]"),
        ("proj-tokens", 9, lambda d: torch.randn(2, 4, 6, device=d), r"proj of shape \[\.\.\., n, K\]"),
        ("proj-fp64", 9, lambda d: torch.randn(3, 4, 6, device=d, dtype=torch.float64), r"proj of dtype"),
        ("stats-shape", 10, lambda d: torch.rand(3, 4, 3, device=d), r"stats of shape \[\.\.\., n, 2\]"),
        ("grad_h_pre-numel", 11, lambda d: torch.randn(3, 5, device=d), r"grad_h_pre with 12 elements"),
        ("grad_h_res-numel", 13, lambda d: torch.randn(3, 4, 3, device=d), r"grad_h_res with 48 elements"),
        ("grad_h_post-int", 12, lambda d: torch.ones(3, 4, device=d, dtype=torch.int64), r"grad_h_post .*floating"),
        ("norm", 14, lambda d: "group", r'norm to be "rms" or "layer", got "group"'),
        ("static-hc", 3, lambda d: None, r"expected dynamic_alpha or dynamic_beta"),
    ]


BAD_BACKWARD = {case[0]: case[1:] for case in _bad_backward_calls()}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
@pytest.mark.parametrize("dev", ["device", "meta"])
def test_backward_bad_arguments_raise(device, case, dev):
    dev = device if dev == "device" else "meta"
    index, replacement, match = BAD_BACKWARD[case]
    n, C = 4, 8
    params = make_params(n, C, dev, parts="alpha-only" if case == "static-hc" else "both")
    x = torch.randn(3, n, C, device=dev)
    if dev == "meta":
        outs = FWD_OP(x, **params)  # fake kernel: shapes only
        optional = [params.get(k) for k in OPTIONAL]
        grads = [torch.randn(o.shape, device=dev) for o in outs[:3]]
        args = [x, params["static_alpha"], params["static_beta"], *optional, outs[3], outs[4], *grads, "rms", True,
                [True] * 9]
    else:
        args = list(_backward_args(x, params))
        BACKWARD_OP(*args)  # valid as built
    args[index] = replacement(dev)
    with pytest.raises(RuntimeError, match=r"hcext::hc_coeffs_backward: .*" + match):
        BACKWARD_OP(*args)


# ---------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.parametrize("name", ["static_alpha", "dynamic_alpha", "norm_bias", "alpha_scale"])
def test_cuda_parameter_on_cpu_raises(name):
    n, C = 4, 8
    x = torch.randn(3, n, C, device="cuda")
    params = make_params(n, C, "cuda", affine="weight+bias")
    params[name] = params[name].cpu()
    with pytest.raises(RuntimeError, match=rf"expected {name} on cuda"):
        OP(x, **params)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n,C,parts", [(1, 64, "both"), (4, 64, "both"), (4, 1280, "alpha-only"), (5, 7, "beta-only"),
                                       (16, 32, "both"), (32, 40, "both")])
def test_cuda_matches_cpu(n, C, parts, norm, dtype):
    tokens = 300  # several chunks of the CUDA parameter-gradient reduction
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x_cpu = torch.randn(tokens, n, C).to(dtype)
    params_cpu = make_params(n, C, "cpu", pdtype, parts=parts, affine="weight+bias")
    weights_cpu = output_weights(x_cpu, True, pdtype)
    results = {}
    for dev in ("cpu", "cuda"):
        x = x_cpu.to(dev)
        params = {k: v.to(dev) for k, v in params_cpu.items()}
        results[dev] = forward_backward(hcext.ops.hc_coeffs, x, params, [w.to(dev) for w in weights_cpu], norm=norm)
    for a, b in zip(results["cuda"][0], results["cpu"][0]):
        assert a.device.type == "cuda"
        assert_scaled_close(a.cpu(), b, pdtype, "output")
    for name, g in results["cuda"][1].items():
        want = results["cpu"][1][name]
        assert g.dtype == want.dtype
        if name == "x" and dtype == torch.bfloat16:  # both round an fp32 value once
            torch.testing.assert_close(g.cpu(), want, **TOLERANCES[torch.bfloat16])
        else:
            assert_scaled_close(g.cpu(), want, pdtype, f"grad_{name}")


@requires_cuda
def test_cuda_deterministic():
    n, C = 4, 64
    x = torch.randn(5000, n, C, device="cuda")
    params = make_params(n, C, "cuda", affine="weight+bias")
    weights = output_weights(x, True, torch.float32)
    first = forward_backward(hcext.ops.hc_coeffs, x, params, weights, norm="layer")
    second = forward_backward(hcext.ops.hc_coeffs, x, params, weights, norm="layer")
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
