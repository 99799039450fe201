"""Tests of the original Hyper-Connections coefficient op against hcext.reference.hc_coeffs:
the public hcext::hc_coeffs, its autograd twin hcext::hc_coeffs_fwd (which also returns the
saved proj and stats) and hcext::hc_coeffs_backward. Values and every gradient over n, both
norms, tanh on/off, static / dynamic (alpha only, beta only, both), norm weight/bias, scales,
leading shapes and strides; bf16/fp16 x; gradcheck; opcheck; what autograd saves;
determinism; torch.compile of a whole HC sub-layer; static HC through the stream ops;
argument errors (real and fake kernels); the HC initialisation (hcext.init) against a
Pre-Norm network; CUDA vs CPU (when a GPU is present).

Parity runs through the shared scaffold (helpers.check_parity). Tolerances: fp32 / fp64
results are compared with the fp64 reference using the dtype's row of helpers.TOLERANCES,
with the atol scaled by the largest |expected| of the tensor (at least 1;
helpers.assert_scaled_close): gradients are sums with cancellation (the norm's backward, sums
over tokens and channels), so their rounding error follows their largest terms, not each
element. bf16 / fp16 x: helpers' low-precision rule: the op's error vs the fp64 reference (on
the same rounded x) is at most twice the error of the reference run on the low-precision x
(fp32 parameters), plus the fp32 row's atol times the tensor's scale.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference
from helpers import (
    NONCONTIGUOUS, BadCase, Result, assert_rejects, assert_scaled_close, check_parity, compare_results,
    forward_backward, layout, layout_cases, requires_cuda, run_opcheck, sample,
)

OP = torch.ops.hcext.hc_coeffs.default
FWD_OP = torch.ops.hcext.hc_coeffs_fwd.default
BACKWARD_OP = torch.ops.hcext.hc_coeffs_backward.default

# Optional parameters in schema order (also the order of hc_coeffs_backward's gradients after
# x, static_alpha, static_beta).
OPTIONAL = ("dynamic_alpha", "dynamic_beta", "alpha_scale", "beta_scale", "norm_weight", "norm_bias")
PARAM_NAMES = ("static_alpha", "static_beta") + OPTIONAL
OUT_NAMES = ("h_pre", "h_post", "h_res")

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


# id -> (leading shape, layout of x [*lead, n, C]): the leading shapes contiguous, then every
# shared layout (helpers.LAYOUTS) at 5 tokens: "lead-permuted" is [n, 5, C] seen as [5, n, C]
# (tokens not outermost), "transposed" [5, C, n] seen as [5, n, C].
LAYOUT_CASES = layout_cases(
    {"lead=()": (), "lead=(0,)": (0,), "lead=(5,)": (5,), "lead=(2,3)": (2, 3)},
    ["lead-permuted", "transposed", "sliced", "expanded", "offset"],
    lead=(5,),
)


def _x(layout_case, n, C, device, dtype=torch.float32):
    """x [*lead, n, C] for a LAYOUT_CASES id, as an Input (a leaf and the view the op sees)."""
    lead, kind = LAYOUT_CASES[layout_case]
    return layout(torch.randn(*lead, n, C, device=device, dtype=dtype), kind)


def hc_sample(x, params, **kwargs):
    """hc_coeffs(x, **params, **kwargs) as a Sample: gradients of x and every parameter."""
    return sample(x, **params, **kwargs, names=["x"])


def check_against_reference(x, params, dtype, **kwargs):
    """The op (through autograd) vs the fp64 reference, through the shared runner: every output
    and every gradient. x: a tensor or an Input. Returns (outputs, {name: grad})."""
    s = hc_sample(x, params, **kwargs)
    got, _ = check_parity(hcext.ops.hc_coeffs, reference.hc_coeffs, s, out_names=OUT_NAMES)
    view = s.tensors()[0]
    dynamic = "dynamic_alpha" in params or "dynamic_beta" in params
    lead, n = (view.shape[:-2] if dynamic else ()), view.shape[-2]
    for name, out, tail in zip(OUT_NAMES, got.outs, ((n,), (n,), (n, n))):
        assert out.dtype == dtype and out.device == view.device, name
        assert out.shape == (*lead, *tail), name
        assert out.is_contiguous(), name
    assert got.grads["x"].dtype == view.dtype
    for name, g in got.grads.items():
        assert g.dtype == (view.dtype if name == "x" else params[name].dtype), name
    return got.outs, got.grads


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


@pytest.mark.parametrize("layout_case", list(LAYOUT_CASES))
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n", [1, 4])
def test_matches_reference_layouts(device, n, norm, layout_case):
    C = 16
    x = _x(layout_case, n, C, device)
    if LAYOUT_CASES[layout_case][1] in NONCONTIGUOUS and n > 1:
        assert not x.tensor().is_contiguous()  # the case tests what it says
    check_against_reference(x, make_params(n, C, device, affine="weight+bias"), torch.float32, norm=norm)


@pytest.mark.parametrize("layout_case", ["lead=(5,)", "lead=(0,)", "transposed", "lead=(2,3)"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n,C", [(1, 3), (3, 7), (4, 64), (8, 5)])
def test_matches_reference_fp64(device, n, C, norm, layout_case):
    x = _x(layout_case, n, C, device, torch.float64)
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
    check_parity(hcext.ops.hc_coeffs, reference.hc_coeffs, hc_sample(x, params, norm="layer"), twice=True,
                 out_names=OUT_NAMES)


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


@pytest.mark.parametrize("parts", ["both", "beta-only"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x(device, dtype, norm, parts):
    n, C = 4, 64
    x = torch.randn(9, n, C, device=device).to(dtype)
    params = make_params(n, C, device, parts=parts, affine="weight+bias")
    got, _ = check_parity(hcext.ops.hc_coeffs, reference.hc_coeffs, hc_sample(x, params, norm=norm),
                          out_names=OUT_NAMES)
    assert all(o.dtype == torch.float32 for o in got.outs)
    assert got.grads["x"].dtype == dtype and all(g.dtype == torch.float32 for k, g in got.grads.items() if k != "x")


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

    def args_kwargs(x, parts="both", affine="weight", dtype=torch.float32, **kwargs):
        p = make_params(x.shape[-2], x.shape[-1], device, dtype, parts=parts, affine=affine)
        args = (x, p.pop("static_alpha"), p.pop("static_beta"))
        return args, dict(p, **kwargs)

    yield "static", args_kwargs(torch.randn(3, 4, 8, device=device), parts="static")
    yield "rms", args_kwargs(torch.randn(6, 4, 8, device=device))
    yield "layer+bias-no-tanh", args_kwargs(torch.randn(6, 4, 8, device=device), affine="weight+bias", norm="layer",
                                            use_tanh=False)
    yield "alpha-only", args_kwargs(torch.randn(2, 3, 2, 5, device=device), parts="alpha-only", affine="none")
    yield "beta-only", args_kwargs(torch.randn(6, 4, 8, device=device), parts="beta-only", norm="layer")
    yield "bf16", args_kwargs(torch.randn(5, 4, 8, device=device).to(torch.bfloat16), norm="layer")
    yield "fp64", args_kwargs(torch.randn(2, 3, 5, device=device, dtype=torch.float64), dtype=torch.float64)
    yield "empty", args_kwargs(torch.randn(0, 4, 8, device=device))
    yield "noncontiguous", args_kwargs(torch.randn(6, 8, 3, device=device).transpose(-1, -2), affine="bias")
    yield "offset", args_kwargs(layout(torch.randn(6, 4, 8, device=device), "offset").tensor(), norm="layer")


SAMPLES = [name for name, _ in _samples("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("op", [OP, FWD_OP], ids=["hc_coeffs", "hc_coeffs_fwd"])
def test_opcheck_forward(device, op, name, requires_grad):
    args, kwargs = dict(_samples(device))[name]
    run_opcheck(op, args, kwargs, requires_grad=requires_grad)


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


@pytest.mark.parametrize("case", [*BACKWARD_SAMPLES, "alpha-only", "bf16", "fp64", "empty", "noncontiguous"])
def test_opcheck_backward(device, case):
    n, C, dtype, parts = 4, 8, torch.float32, "both"
    x = torch.randn(3, n, C, device=device)
    if case == "bf16":
        x = x.to(torch.bfloat16)
    elif case == "fp64":
        x, dtype = x.double(), torch.float64
    elif case == "empty":
        x = x[:0]
    elif case == "noncontiguous":
        x = torch.randn(3, C, n, device=device).transpose(-1, -2)
    elif case == "alpha-only":
        parts = "alpha-only"
    params = make_params(n, C, device, dtype, parts=parts, affine="weight+bias")
    run_opcheck(BACKWARD_OP, _backward_args(x, params, **BACKWARD_SAMPLES.get(case, {})))


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
    autograd = forward_backward(hcext.ops.hc_coeffs, hc_sample(x, params, norm="layer"))
    args = list(_backward_args(x, params, norm="layer"))
    args[11:14] = autograd.weights
    direct = BACKWARD_OP(*args)
    for name, g in zip(["x", *PARAM_NAMES], direct):
        assert torch.equal(autograd.grads[name], g), name


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
    # and they suffice for a correct backward: the saved tensors' grads vs the reference's on
    # the same bf16 x, with the shared loss weights
    ref = forward_backward(reference.hc_coeffs, hc_sample(x, params, norm=norm))
    sum((o * w).sum() for o, w in zip(outs, ref.weights)).backward()
    assert x.grad.dtype == torch.bfloat16
    grads = {"x": x.grad, **{name: p.grad for name, p in params.items()}}
    compare_results(Result(ref.outs, grads, []), ref, scales={"grad_x": None})


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
    s = hc_sample(x, make_params(n, C, "cpu", affine="weight+bias"), norm="layer")
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (threads, threads, 1):
            torch.set_num_threads(t)
            results.append(forward_backward(hcext.ops.hc_coeffs, s))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r.outs, results[0].outs))
        assert all(torch.equal(r.grads[k], results[0].grads[k]) for k in r.grads)


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
    # gradients are summed over tokens by the stream ops' backward. The shared runner, the
    # reference sub-layer in fp64.
    x, weight, params = sublayer_inputs(9, device=device, parts=parts)
    check_parity(lambda x, weight, **p: hc_sublayer(x, weight, p, norm),
                 lambda x, weight, **p: reference_sublayer(x, weight, p, norm),
                 sample(x, weight, **params, names=["x", "weight"]), out_names=["out"])


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
    """BadCases: make(device) gives the call hc_coeffs(x, **params, **kwargs) as a Sample, with x
    [2, 4, 8] unless changed."""

    def valid(name, match, n=4, C=8, x_dtype=torch.float32, parts="both", **changes):
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
            return sample(x, **params, **kwargs)

        return BadCase(name, make, match)

    def randn(*shape, dtype=torch.float32):
        return lambda d: torch.randn(shape, device=d, dtype=dtype)

    return [
        valid("static_alpha-square", r"static_alpha of shape \[n, n\+1\] = \[4, 5\]", static_alpha=randn(4, 4)),
        valid("static_alpha-n-mismatch", r"static_alpha of shape \[n, n\+1\] = \[4, 5\]",
              static_alpha=randn(3, 4)),
        valid("static_alpha-static-hc", r"static_alpha of shape", parts="static", static_alpha=randn(5, 6)),
        valid("static_beta-n-mismatch", r"static_beta of shape \[n\] = \[4\]", static_beta=randn(5)),
        valid("static_beta-2d", r"static_beta of shape \[n\] = \[4\]", static_beta=randn(1, 4)),
        valid("dynamic_alpha-cols", r"dynamic_alpha of shape \[C, n\+1\] = \[8, 5\]", dynamic_alpha=randn(8, 4)),
        valid("dynamic_alpha-rows", r"dynamic_alpha of shape \[C, n\+1\] = \[8, 5\]", dynamic_alpha=randn(9, 5)),
        valid("dynamic_beta-C", r"dynamic_beta of shape \[C\] = \[8\]", dynamic_beta=randn(7)),
        valid("dynamic_beta-2d", r"dynamic_beta of shape \[C\] = \[8\]", dynamic_beta=randn(8, 1)),
        valid("alpha_scale-1d", r"alpha_scale of shape \[\] \(0-dim\)", alpha_scale=randn(1)),
        valid("beta_scale-1d", r"beta_scale of shape \[\] \(0-dim\)", beta_scale=randn(2)),
        valid("norm_weight-C", r"norm_weight of shape \[C\] = \[8\]", norm_weight=randn(9)),
        valid("norm_bias-C", r"norm_bias of shape \[C\] = \[8\]", norm_bias=randn(4)),
        valid("unknown-norm", r'norm to be "rms" or "layer", got "batch"', norm="batch"),
        valid("unknown-norm-static", r'norm to be "rms" or "layer", got "RMS"', parts="static", norm="RMS"),
        valid("static_alpha-fp64", r"static_alpha of dtype", static_alpha=randn(4, 5, dtype=torch.float64)),
        valid("dynamic_alpha-bf16", r"dynamic_alpha of dtype", dynamic_alpha=randn(8, 5, dtype=torch.bfloat16)),
        valid("alpha_scale-fp16", r"alpha_scale of dtype", alpha_scale=randn(dtype=torch.float16)),
        valid("norm_weight-fp64", r"norm_weight of dtype", norm_weight=randn(8, dtype=torch.float64)),
        valid("fp64-x-fp32-params", r"static_alpha of dtype", x_dtype=torch.float64),
        valid("x-int", r"x of dtype .*got \S*(Long|int64)", x=lambda d: torch.randint(0, 5, (2, 4, 8), device=d)),
        valid("x-1d", r"x of shape \[\.\.\., n, C\] with at least 2 dims", x=randn(8)),
        valid("n=33", r"n = x.size\(-2\) in \[1, 32\], got 33", n=33, C=1),
        valid("n=0", r"n = x.size\(-2\) in \[1, 32\], got 0", x=randn(2, 0, 8)),
        valid("C=0", r"C = x.size\(-1\) >= 1, got 0", x=randn(2, 4, 0)),
        valid("norm_eps<0", r"norm_eps finite and >= 0", norm_eps=-1e-6),
        valid("norm_eps=nan", r"norm_eps finite and >= 0, got nan", norm_eps=float("nan")),
    ]


BAD_CALLS = {case.id: case for case in _bad_calls()}


@pytest.mark.parametrize("entry", ["op", "fwd_op", "wrapper"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise(device, case, entry):
    fn = {"op": OP, "fwd_op": FWD_OP, "wrapper": hcext.ops.hc_coeffs}[entry]
    assert_rejects(fn, BAD_CALLS[case], device, prefix=r"hcext::hc_coeffs: .*")


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_in_fake_kernel(case):
    # torch.compile / export see the fake kernel: it rejects the same inputs, with the same words.
    assert_rejects(OP, BAD_CALLS[case], "meta", prefix=r"hcext::hc_coeffs: .*")


def _bad_backward_calls():
    """BadCases of hc_coeffs_backward: valid arguments for x [3, 4, 8] (dynamic HC; on meta built
    from the fake kernel's shapes) with the argument at an index replaced."""

    def replace(name, index, replacement, match):
        def make(d):
            n, C = 4, 8
            params = make_params(n, C, d, parts="alpha-only" if name == "static-hc" else "both")
            x = torch.randn(3, n, C, device=d)
            if d == "meta":
                outs = FWD_OP(x, **params)  # fake kernel: shapes only
                optional = [params.get(k) for k in OPTIONAL]
                grads = [torch.randn(o.shape, device=d) for o in outs[:3]]
                args = [x, params["static_alpha"], params["static_beta"], *optional, outs[3], outs[4], *grads, "rms",
                        True, [True] * 9]
            else:
                args = list(_backward_args(x, params))
                BACKWARD_OP(*args)  # valid as built
            args[index] = replacement(d)
            return sample(*args)

        return BadCase(name, make, match)

    return [
        replace("proj-K", 9, lambda d: torch.randn(3, 4, 5, device=d),
                r"proj of shape \[\.\.\., n, K\] = \[\.\.\., 4, 6\]"),
        replace("proj-tokens", 9, lambda d: torch.randn(2, 4, 6, device=d), r"proj of shape \[\.\.\., n, K\]"),
        replace("proj-fp64", 9, lambda d: torch.randn(3, 4, 6, device=d, dtype=torch.float64), r"proj of dtype"),
        replace("stats-shape", 10, lambda d: torch.rand(3, 4, 3, device=d), r"stats of shape \[\.\.\., n, 2\]"),
        replace("grad_h_pre-numel", 11, lambda d: torch.randn(3, 5, device=d), r"grad_h_pre with 12 elements"),
        replace("grad_h_res-numel", 13, lambda d: torch.randn(3, 4, 3, device=d), r"grad_h_res with 48 elements"),
        replace("grad_h_post-int", 12, lambda d: torch.ones(3, 4, device=d, dtype=torch.int64),
                r"grad_h_post .*floating"),
        replace("norm", 14, lambda d: "group", r'norm to be "rms" or "layer", got "group"'),
        replace("static-hc", 3, lambda d: None, r"expected dynamic_alpha or dynamic_beta"),
    ]


BAD_BACKWARD = {case.id: case for case in _bad_backward_calls()}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
@pytest.mark.parametrize("dev", ["device", "meta"])
def test_backward_bad_arguments_raise(device, case, dev):
    assert_rejects(BACKWARD_OP, BAD_BACKWARD[case], device if dev == "device" else "meta",
                   prefix=r"hcext::hc_coeffs_backward: .*")


# ---------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.parametrize("name", ["static_alpha", "dynamic_alpha", "norm_bias", "alpha_scale"])
def test_cuda_parameter_on_cpu_raises(name):
    def make(d):
        n, C = 4, 8
        params = make_params(n, C, d, affine="weight+bias")
        params[name] = params[name].cpu()
        return hc_sample(torch.randn(3, n, C, device=d), params)

    assert_rejects(OP, BadCase(f"{name}-on-cpu", make, rf"expected {name} on cuda"), "cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n,C,parts", [(1, 64, "both"), (4, 64, "both"), (4, 1280, "alpha-only"), (5, 7, "beta-only"),
                                       (16, 32, "both"), (32, 40, "both")])
def test_cuda_matches_cpu(n, C, parts, norm, dtype):
    tokens = 300  # several chunks of the CUDA parameter-gradient reduction
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = hc_sample(torch.randn(tokens, n, C).to(dtype), make_params(n, C, "cpu", pdtype, parts=parts,
                                                                    affine="weight+bias"), norm=norm)
    cpu = forward_backward(hcext.ops.hc_coeffs, s)
    gpu = forward_backward(hcext.ops.hc_coeffs, s.to("cuda"))
    assert all(o.device.type == "cuda" for o in gpu.outs)
    assert all(gpu.grads[k].dtype == cpu.grads[k].dtype for k in cpu.grads)
    # bf16 grad_x: both round an fp32 value once (the bf16 row, unscaled)
    compare_results(gpu.to("cpu"), cpu, scales={"grad_x": None} if dtype == torch.bfloat16 else {},
                    out_names=OUT_NAMES)


@requires_cuda
def test_cuda_deterministic():
    n, C = 4, 64
    s = hc_sample(torch.randn(5000, n, C, device="cuda"), make_params(n, C, "cuda", affine="weight+bias"),
                  norm="layer")
    first = forward_backward(hcext.ops.hc_coeffs, s)
    second = forward_backward(hcext.ops.hc_coeffs, s)
    assert all(torch.equal(a, b) for a, b in zip(first.outs, second.outs))
    assert all(torch.equal(first.grads[k], second.grads[k]) for k in first.grads)
