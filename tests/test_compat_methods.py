"""The public ``width_connection`` / ``depth_connection`` of every hcext.compat class, driven by
hand against the original ``hyper-connections`` package (issue 18), and the package's README
usage, manual mode and dtype restoration run against hcext.compat.

The package's contract (read from its source): ``width_connection(residuals)`` returns
``(branch_input, H_res-mixed residuals, kwargs)`` and ``depth_connection(branch_output,
residuals, **kwargs)`` returns ``residuals + beta * branch_output``; the caller may pass its own
residuals to the depth connection. mHC/mHCv2 return everything in the residuals' dtype.

fp16 comparisons (see ``check_fp16``): hcext computes every coefficient and mix in fp32 and
rounds each result once, so it is compared with the package's formula evaluated in fp32 on the
same fp16 values, rounded once (the suite's fp16 tolerance). Against the package's own fp16
run it is also close, within the table plus the package's own extra roundings, which are:
its depth connection rounds ``beta * branch_output`` to fp16 before adding the residuals; its
HC, whose parameters must be fp16 to take fp16 input, computes the norm and every product in
fp16 (compared with the bf16 row, about 8 fp16 ulps).
"""

import copy
import random

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TOLERANCES, assert_close_dtype
from test_compat import assert_same, perturb, run

from hcext.compat import hyper_connections as compat
from hcext.compat import mHCv2 as compat_v2

H = pytest.importorskip("hyper_connections", reason="the original hyper-connections package is not installed")
try:
    from hyper_connections import mHCv2 as H_v2
except ImportError:  # it needs torch_einops_utils: the mHCv2 cases are left out
    H_v2 = None

N, DIM = 4, 16

# name: (package class, compat class, constructor kwargs, layout). "folded": (b s) ... d;
# "streams": [..., s, d] (mHCv2).
CASES = {
    "Residual": (H.Residual, compat.Residual, {}, "folded"),
    "HyperConnections": (H.HyperConnections, compat.HyperConnections, dict(layer_index=1), "folded"),
    "HyperConnections-no-tanh": (H.HyperConnections, compat.HyperConnections, dict(layer_index=2, tanh=False),
                                 "folded"),
    "mHC": (H.mHC, compat.mHC, dict(layer_index=1), "folded"),
    "mHC-proposals": (H.mHC, compat.mHC, dict(layer_index=3, num_dynamic_alpha_proposals=2, sinkhorn_iters=7),
                      "folded"),
}
if H_v2 is not None:
    CASES.update({
        "mHCv2": (H_v2.mHC, compat_v2.mHC, dict(layer_index=1), "streams"),
        "mHCv2-mix-before-norm": (H_v2.mHC, compat_v2.mHC, dict(layer_index=2, mix_streams_before_norm=True),
                                  "streams"),
        "mHCv2-Residual": (H_v2.Residual, compat_v2.Residual, {}, "streams"),
    })
HC_CASES = [name for name in CASES if name.startswith("HyperConnections")]


def build(name, device="cpu", **extra):
    """(package module, compat module loaded from it with strict=True), parameters perturbed."""
    orig_cls, new_cls, kwargs, _ = CASES[name]
    kwargs = {**kwargs, **extra}
    state = random.getstate()
    orig = orig_cls(N, dim=DIM, **kwargs).to(device)
    random.setstate(state)
    new = new_cls(N, dim=DIM, **kwargs).to(device)
    perturb(orig)
    new.load_state_dict(orig.state_dict(), strict=True)
    return orig, new


def residual_input(name, device, dtype=torch.float32, batch=2, lead=(3,)):
    if CASES[name][3] == "folded":
        return torch.randn(batch * N, *lead, DIM, device=device).to(dtype)
    return torch.randn(batch, *lead, N, DIM, device=device).to(dtype)


def by_hand(lin, own_residual):
    """Manual mode: width, the branch, depth; the depth connection gets the mixed residuals that
    width_connection returned, or (own_residual) the caller's residuals."""

    def call(module, x):
        branch_input, residuals, kwargs = module.width_connection(x)
        return module.depth_connection(torch.tanh(lin(branch_input)), x if own_residual else residuals, **kwargs)

    return call


def assert_same_structure(new_out, orig_out):
    """Same tuple structure, same kwargs keys, and per tensor the same shape and dtype."""
    (bn, rn, kn), (bo, ro, ko) = new_out, orig_out
    assert isinstance(kn, dict) and sorted(kn) == sorted(ko)
    for what, a, b in [("branch_input", bn, bo), ("residuals", rn, ro)] + [(k, kn[k], ko[k]) for k in ko]:
        if b is None:
            assert a is None, what
            continue
        assert (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype), (what, a.shape, a.dtype, b.shape, b.dtype)


# ---------------------------------------------------------------------------------------
# fp32: values and gradients


@pytest.mark.parametrize("own_residual", [False, True], ids=["mixed-residuals", "caller-residuals"])
@pytest.mark.parametrize("name", list(CASES))
def test_width_depth_by_hand_fp32(device, name, own_residual):
    orig, new = build(name, device)
    x = residual_input(name, device)
    bo, ro, ko = orig.width_connection(x)
    bn, rn, kn = new.width_connection(x)
    assert_same_structure((bn, rn, kn), (bo, ro, ko))
    for what, a, b in [("branch_input", bn, bo), ("residuals", rn, ro)] + [(k, kn[k], ko[k]) for k in ko]:
        assert_close_dtype(a, b, msg=lambda m, what=what: f"{name} {what}: {m}")
    lin = nn.Linear(DIM, DIM, device=device)
    call = by_hand(lin, own_residual)
    assert_same(run(orig, x, [lin], call), run(new, x, [lin], call))


@pytest.mark.parametrize("name", [n for n in CASES if "Residual" not in n])
def test_width_without_branch_output_added(device, name):
    """add_branch_out_to_residual=False: beta is None, the branch input and mixed residuals as theirs."""
    orig, new = build(name, device, add_branch_out_to_residual=False)
    x = residual_input(name, device)
    (bo, ro, ko), (bn, rn, kn) = orig.width_connection(x), new.width_connection(x)
    assert ko == {"beta": None} and kn == {"beta": None}
    assert_close_dtype(bn, bo)
    assert_close_dtype(rn, ro)


def test_depth_connection_broadcasts_beta_as_theirs(device):
    """Their depth connection is an einsum: a beta shared over the tokens ([b, 1, 1, s, 1])
    broadcasts. Same here (and a malformed beta fails with a message naming the shape)."""
    orig, new = build("mHC", device)
    x = residual_input("mHC", device)
    branch_input, _, kwargs = new.width_connection(x)
    f = torch.randn_like(branch_input)
    shared = kwargs["beta"][:, :1]
    assert_close_dtype(new.depth_connection(f, x, beta=shared), orig.depth_connection(f, x, beta=shared))
    with pytest.raises(ValueError, match=r"beta of shape \[b, \.\.\., 1, s, 1\]"):
        new.depth_connection(f, x, beta=kwargs["beta"][..., 0, :, 0])


# ---------------------------------------------------------------------------------------
# fp16


def _within(actual, expected, extra, dtype, what):
    """|actual - expected| <= the table's atol + rtol * |expected| + extra (elementwise)."""
    tol = TOLERANCES[dtype]
    err = (actual.float() - expected.float()).abs()
    bound = tol["atol"] + tol["rtol"] * expected.float().abs() + extra
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: {int((err > bound).sum())} element(s) out of bound, worst {actual.flatten()[worst].item()} vs "
        f"{expected.flatten()[worst].item()} (bound {bound.flatten()[worst].item():.3g})"
    )


def check_fp16(name, orig, new, x16):
    """The module comparison described in the file docstring. ``orig`` holds fp16 parameters
    (the package's HC needs them for fp16 input); ``new`` keeps fp32 parameters with the same
    (fp16-representable) values."""
    orig32 = copy.deepcopy(orig).float()
    bo, ro, ko = orig.width_connection(x16)
    bn, rn, kn = new.width_connection(x16)
    assert_same_structure((bn, rn, kn), (bo, ro, ko))
    assert bn.dtype == rn.dtype == torch.float16 and all(v.dtype == torch.float16 for v in kn.values())

    # the package's formula in fp32 on the same fp16 values, rounded once
    b32, r32, k32 = orig32.width_connection(x16.float())
    assert_close_dtype(bn, b32.half(), msg=lambda m: f"{name} branch_input vs fp32: {m}")
    assert_close_dtype(rn, r32.half(), msg=lambda m: f"{name} residuals vs fp32: {m}")
    for k in kn:
        assert_close_dtype(kn[k], k32[k].half(), msg=lambda m, k=k: f"{name} {k} vs fp32: {m}")

    # the package's own fp16 run
    width_dtype = torch.bfloat16 if name in HC_CASES else torch.float16
    for what, a, b in [("branch_input", bn, bo), ("residuals", rn, ro)] + [(k, kn[k], ko[k]) for k in ko]:
        _within(a, b, 0.0, width_dtype, f"{name} {what} vs the package's fp16 run")

    # depth, with the caller's residuals and the package's kwargs (either side's kwargs work)
    f = torch.randn_like(bo)
    dn = new.depth_connection(f, x16, **ko)
    do = orig.depth_connection(f, x16, **ko)
    assert dn.dtype == do.dtype == torch.float16 and dn.shape == do.shape
    d32 = orig32.depth_connection(f.float(), x16.float(), **{k: v.float() for k, v in ko.items()})
    assert_close_dtype(dn, d32.half(), msg=lambda m: f"{name} depth vs fp32: {m}")
    if ko:
        beta_f = (d32 - x16.float()).abs()  # |beta * branch_output|, the term the package rounds first
        _within(dn, do, beta_f * 2.0**-11, torch.float16, f"{name} depth vs the package's fp16 run")
    else:
        torch.testing.assert_close(dn, do, rtol=0, atol=0)
    # with its own kwargs (beta may differ from theirs by one rounding): the same check
    d32_own = orig32.depth_connection(f.float(), x16.float(), **{k: v.float() for k, v in kn.items()})
    assert_close_dtype(new.depth_connection(f, x16, **kn), d32_own.half(),
                       msg=lambda m: f"{name} depth, own kwargs: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_width_depth_by_hand_fp16(device, name):
    orig, new = build(name, device)
    orig = orig.half()
    new.load_state_dict(orig.state_dict(), strict=True)  # fp32 parameters, fp16-representable values
    assert all(p.dtype == torch.float32 for p in new.parameters())
    check_fp16(name, orig, new, residual_input(name, device, torch.float16))


# ---------------------------------------------------------------------------------------
# dtype restoration (the package's behaviour for fp32 modules and half-precision residuals)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", [n for n in ("mHC", "mHCv2") if n in CASES])
def test_dtype_restoration(device, which, dtype):
    """An fp32 module with fp16/bf16 residuals: the kwargs, branch input and result in the
    residuals' dtype, as the package's. The issue's exact call sequence."""
    orig_cls, new_cls = (H.ManifoldConstrainedHyperConnections, compat.ManifoldConstrainedHyperConnections) \
        if which == "mHC" else (H_v2.ManifoldConstrainedHyperConnections, compat_v2.ManifoldConstrainedHyperConnections)
    state = random.getstate()
    orig = orig_cls(num_residual_streams=4, dim=64, add_branch_out_to_residual=True).to(device)
    random.setstate(state)
    new = new_cls(num_residual_streams=4, dim=64, add_branch_out_to_residual=True).to(device)
    new.load_state_dict(orig.state_dict(), strict=True)
    shape = (4, 1, 64) if which == "mHC" else (1, 1, 4, 64)
    residual = torch.randn(*shape, device=device).to(dtype)

    results = {}
    for label, module in (("package", orig), ("hcext", new)):
        branch_input, _, residual_kwargs = module.width_connection(residual)
        assert list(residual_kwargs) == ["beta"] and residual_kwargs["beta"].dtype == dtype
        assert branch_input.dtype == dtype
        torch.manual_seed(7)
        branch_output = torch.randn_like(branch_input).to(dtype)
        out = module.depth_connection(branch_output, residual, **residual_kwargs)
        assert out.dtype == dtype and out.shape == residual.shape
        results[label] = (branch_input, residual_kwargs["beta"], out)
    for a, b in zip(results["hcext"][:2], results["package"][:2]):
        assert_close_dtype(a, b)
    # the result: the package rounds beta * f to the dtype before adding the residual, hcext
    # rounds the sum once: they differ by up to that rounding, u * |beta * f| (u: the unit roundoff)
    unit_roundoff = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    beta_f = (results["package"][2].float() - residual.float()).abs()
    _within(results["hcext"][2], results["package"][2], 1.5 * unit_roundoff * beta_f, dtype, "depth result")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", HC_CASES)
def test_hc_half_residuals_with_fp32_parameters(device, name, dtype):
    """The package's HC cannot take fp16/bf16 residuals with fp32 parameters (a matmul dtype
    error); hcext's can, with the same dtype restoration as mHC and the numbers of the package's
    formula in fp32 rounded once."""
    orig, new = build(name, device)
    x = residual_input(name, device, dtype)
    with pytest.raises(RuntimeError):
        orig.width_connection(x)
    branch_input, residuals, kwargs = new.width_connection(x)
    assert branch_input.dtype == residuals.dtype == kwargs["beta"].dtype == dtype
    b32, r32, k32 = orig.width_connection(x.float())
    assert_close_dtype(branch_input, b32.to(dtype))
    assert_close_dtype(residuals, r32.to(dtype))
    assert_close_dtype(kwargs["beta"], k32["beta"].to(dtype))
    f = torch.randn_like(branch_input)
    out = new.depth_connection(f, x, **kwargs)
    assert out.dtype == dtype
    assert_close_dtype(out, orig.depth_connection(f.float(), x.float(), beta=kwargs["beta"].float()).to(dtype))


# ---------------------------------------------------------------------------------------
# forward keeps the fused path; overriding the public methods reroutes forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", [n for n in ("HyperConnections", "mHC", "mHCv2") if n in CASES])
def test_forward_equals_manual_mode(device, name, dtype):
    _, new = build(name, device)
    lin = nn.Linear(DIM, DIM, device=device).to(dtype)
    x = residual_input(name, device, dtype)
    branch_input, add_residual = new(x)
    fused = add_residual(torch.tanh(lin(branch_input)))
    manual = by_hand(lin, own_residual=False)
    with torch.no_grad():
        expected = manual(new, x)
    assert fused.dtype == expected.dtype == dtype
    # fp16: the manual path rounds H_res x before adding beta * f, the fused one rounds once
    assert_close_dtype(fused.detach(), expected, dtype=torch.bfloat16 if dtype == torch.float16 else dtype)


@pytest.mark.parametrize("name", [n for n in ("HyperConnections", "mHC", "mHCv2", "Residual") if n in CASES])
def test_subclass_overriding_public_methods_is_used_by_forward(device, name):
    """As in the package, forward goes through width_connection / depth_connection when a
    subclass overrides them (here: a gate on the branch output)."""
    _, new_cls, kwargs, _ = CASES[name]
    calls = []

    class Gated(new_cls):
        def depth_connection(self, branch_output, residuals, **kw):
            calls.append("depth")
            return super().depth_connection(0.5 * branch_output, residuals, **kw)

    random.seed(0)
    plain = new_cls(N, dim=DIM, **kwargs).to(device)
    random.seed(0)
    gated = Gated(N, dim=DIM, **kwargs).to(device)
    perturb(plain)
    gated.load_state_dict(plain.state_dict())
    lin = nn.Linear(DIM, DIM, device=device)
    x = residual_input(name, device)
    branch_input, add_residual = gated(x)
    out = add_residual(lin(branch_input))
    assert calls == ["depth"]
    bi, res, kw = plain.width_connection(x)
    torch.testing.assert_close(out, plain.depth_connection(0.5 * lin(bi), res, **kw), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------
# hcext's ops do the work


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", [n for n in ("HyperConnections", "mHC", "mHCv2", "mHCv2-mix-before-norm")
                                  if n in CASES])
def test_public_methods_run_on_hcext_ops(name):
    _, new = build(name)
    x = residual_input(name, "cpu")
    with _RecordOps() as width_ops:
        branch_input, residuals, kwargs = new.width_connection(x)
    with _RecordOps() as depth_ops:
        new.depth_connection(torch.randn_like(branch_input), x, **kwargs)

    def ran(names, op):  # an op or its forward half (hc_coeffs runs as hcext::hc_coeffs_fwd)
        return any(n == op or n.startswith(op + "_fwd") for n in names)

    for op in ("hcext::hc_coeffs", "hcext::stream_aggregate", "hcext::stream_mix_expand"):
        assert ran(width_ops.names, op), (op, width_ops.names)
    if name.startswith("mHC"):
        assert ran(width_ops.names, "hcext::sinkhorn"), width_ops.names
    assert ran(depth_ops.names, "hcext::stream_mix_expand"), depth_ops.names
    # no eager reimplementation of the mixes (their einsums lower to bmm / mm)
    for names in (width_ops.names, depth_ops.names):
        assert not {"aten::bmm", "aten::mm", "aten::matmul", "aten::einsum"} & set(names), names


# ---------------------------------------------------------------------------------------
# the package's README, run against hcext.compat


@pytest.mark.parametrize("disable", [False, True])
def test_readme_usage(device, disable):
    """Both README snippets (wrapped branch; manual ``branch_input, add_residual``) plus
    decorate_branch, with the package and with hcext.compat: the same numbers."""
    dim = 32
    torch.manual_seed(0)
    branch = nn.Linear(dim, dim).to(device)
    residual0 = torch.randn(2, 8, dim, device=device)
    branch_state = copy.deepcopy(branch.state_dict())
    outputs = {}
    for label, package in (("package", H), ("hcext", compat)):
        branch.load_state_dict(branch_state)  # perturb below reaches it through `wrapped`
        random.seed(0)
        init_hyper_conn, expand_stream, reduce_stream = package.get_init_and_expand_reduce_stream_functions(
            4, disable=disable)
        wrapped = init_hyper_conn(dim=dim, branch=branch).to(device)
        manual = init_hyper_conn(dim=dim).to(device)
        decorated = init_hyper_conn(dim=dim).to(device)
        torch.manual_seed(1)
        for module in (wrapped, manual, decorated):
            perturb(module, 0.2)
        residual = expand_stream(residual0)
        residual = wrapped(residual)
        branch_input, add_residual = manual(residual)
        residual = add_residual(branch(branch_input))
        residual = decorated.decorate_branch(branch)(residual)
        outputs[label] = reduce_stream(residual)
    assert outputs["hcext"].shape == residual0.shape
    assert_close_dtype(outputs["hcext"], outputs["package"])
