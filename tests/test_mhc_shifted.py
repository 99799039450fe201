"""DeepSeek-V4.1's shifted collapse (issue 15, part 2): the ops hcext::mhc_pre_shifted and
hcext::mhc_post_pre_shifted (with their autograd twins *_fwd and their backward ops
hcext::mhc_shifted_backward / hcext::mhc_post_pre_shifted_backward), and the modules
``HyperConnection(..., collapse="shifted")`` / ``HyperConnectionStack(..., collapse="shifted")``.

V4.1: sub-layer k's coefficients (h_post, H_res and its own h_pre) come from its streams X_k as
in mHC, but its layer input is collapsed with the previous sub-layer's pre:
``y_k = Σ_i π_k[i] X_k[i]``, ``π_0 = e_0``, ``π_k = h_pre_{k-1}``; the output is the last streams
collapsed with the last pre.

Checked here:
- the reference (hcext.reference.mhc_pre_shifted / mhc_post_pre_shifted) against the spec's
  gradient formulas (∂X[i] = π[i]·g, ∂π[i] = Σ_c g[c]·X[i, c], h_pre's gradient only from the
  next collapse), exactly;
- the ops against the reference: every output and every input gradient (pre_mix included),
  fp64 and fp32 over n ∈ {1, 2, 4, 8}, C ∈ {1, 7, 64}, leading shapes (0,), (5,), (2, 3),
  per-token and shared pre_mix, and strided inputs; bf16 / fp16 streams by helpers' "twice the
  reference's error" rule (helpers.assert_within_twice_reference_error through
  helpers.check_parity); gradcheck (fp64); torch.library.opcheck of the public, *_fwd and
  backward ops; torch.compile (aot_eager and inductor, fullgraph, dynamic token count);
  bad pre_mix (shape, dtype; device on CUDA) raising errors that name pre_mix, eagerly, in the
  fake kernels (meta) and under torch.compile;
- the modules: a 4-sub-layer shifted stack against a plain-PyTorch V4.1 chain written here and
  against the reference chain (fp64, forward and every gradient), fused and unfused
  boundaries; block recompute bitwise equal to no recompute (eager, and compiled with
  fullgraph=True); initialisation equal to a Pre-Norm network; chaining stacks; argument errors.

Tolerances: helpers.TOLERANCES through helpers.check_parity (fp32 / fp64 against the fp64
reference with the dtype's row, atol scaled by the tensor's largest magnitude).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference
from hcext.nn import HyperConnection, HyperConnectionStack, expand_streams, shifted_collapse
from helpers import (
    BadCase, assert_rejects, assert_scaled_close, check_parity, layout, requires_cuda, run_opcheck, sample,
)

PRE_OUTPUTS = ("layer_input", "h_post", "h_res", "next_pre_mix")
PRE_INPUTS = ("x", "pre_mix", "phi", "alpha", "bias")
POST_PRE_OUTPUTS = ("x_next", "layer_input", "h_post_next", "h_res_next", "next_pre_mix")
POST_PRE_INPUTS = ("f", "x", "h_post", "h_res", "pre_mix", "phi", "alpha", "bias")

LEADS = {"lead=(0,)": (0,), "lead=(5,)": (5,), "lead=(2,3)": (2, 3)}
NS = [1, 2, 4, 8]
CS = [1, 7, 64]


def _op(name):
    """torch.ops.hcext.<name>.default, looked up when a test runs."""
    return getattr(torch.ops.hcext, name).default


def _width(n):
    return n * n + 2 * n


# ---------------------------------------------------------------------------------------
# Inputs


def _pre_mix(lead, n, device, dtype, shared):
    """A previous sub-layer's h_pre: sigmoid values + 1e-6, per token [*lead, n] or shared [n]."""
    return torch.sigmoid(torch.randn(*(() if shared else lead), n, device=device, dtype=dtype)) + 1e-6


def _params(n, C, device, dtype):
    phi = torch.randn(n * C, _width(n), device=device, dtype=dtype) / math.sqrt(n * C)
    alpha = torch.empty(3, device=device, dtype=dtype).uniform_(0.01, 1.0)
    bias = torch.randn(_width(n), device=device, dtype=dtype) * 0.5
    return [phi, alpha, bias]


def _coef_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pre_inputs(lead, n, C, device, dtype=torch.float32, shared=False, x_layout="contiguous", mix_layout="contiguous"):
    """[x, pre_mix, phi, alpha, bias] of mhc_pre_shifted; x and pre_mix as helpers.Inputs."""
    coef = _coef_dtype(dtype)
    x = torch.randn(*lead, n, C, device=device).to(dtype)
    return [layout(x, x_layout), layout(_pre_mix(lead, n, device, coef, shared), mix_layout),
            *_params(n, C, device, coef)]


def _post_pre_inputs(lead, n, C, device, dtype=torch.float32, shared=False, f_layout="contiguous",
                     mix_layout="contiguous"):
    """[f, x, h_post, h_res, pre_mix, phi, alpha, bias] of mhc_post_pre_shifted; ``shared``: the
    incoming h_post, h_res and pre_mix shared by every token."""
    coef = _coef_dtype(dtype)
    coef_lead = () if shared else lead
    x = torch.randn(*lead, n, C, device=device).to(dtype)
    f = torch.randn(*lead, C, device=device).to(dtype)
    h_post = 2 * torch.rand(*coef_lead, n, device=device, dtype=coef)
    h_res = reference.sinkhorn(torch.randn(*coef_lead, n, n, device=device, dtype=coef), 20)
    return [layout(f, f_layout), layout(x, f_layout), h_post, h_res,
            layout(_pre_mix(lead, n, device, coef, shared), mix_layout), *_params(n, C, device, coef)]


def _tensors(inputs):
    return sample(*inputs).tensors()


def _check_pre(inputs, *scalars):
    s = sample(*inputs, *scalars, names=PRE_INPUTS)
    got, ref = check_parity(_op("mhc_pre_shifted"), reference.mhc_pre_shifted, s, out_names=PRE_OUTPUTS)
    for name, g, t in zip(PRE_INPUTS, got.grads.values(), s.tensors()):
        assert g.dtype == t.dtype, name
    x = s.tensors()[0]
    assert got.outs[0].dtype == x.dtype and got.outs[3].dtype == _coef_dtype(x.dtype)
    return got, ref


def _check_post_pre(inputs, *scalars):
    s = sample(*inputs, *scalars, names=POST_PRE_INPUTS)
    got, ref = check_parity(_op("mhc_post_pre_shifted"), reference.mhc_post_pre_shifted, s, out_names=POST_PRE_OUTPUTS)
    for name, g, t in zip(POST_PRE_INPUTS, got.grads.values(), s.tensors()):
        assert g.dtype == t.dtype, name
    return got, ref


# ---------------------------------------------------------------------------------------
# The reference against the spec (no hcext op involved)


@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
def test_reference_gradients_follow_the_spec(shared):
    # ∂X[i] = π[i]·g and ∂π[i] = Σ_c g[c]·X[i, c] from the layer input alone; h_pre (the
    # next pre_mix) gets its gradient only from the next collapse.
    lead, n, C = (2, 3), 4, 7
    x, pre_mix, phi, alpha, bias = [t.double().requires_grad_(True) for t in
                                    _tensors(_pre_inputs(lead, n, C, "cpu", torch.float64, shared=shared))]
    y, h_post, h_res, next_pre = reference.mhc_pre_shifted(x, pre_mix, phi, alpha, bias)
    g = torch.randn_like(y)
    gx, gmix, gphi = torch.autograd.grad(y, (x, pre_mix, phi), g, allow_unused=True, materialize_grads=True)
    pi = pre_mix.expand(*lead, n)
    torch.testing.assert_close(gx, pi.unsqueeze(-1) * g.unsqueeze(-2), atol=1e-14, rtol=0)
    want_mix = torch.einsum("...c,...ic->...i", g, x)
    torch.testing.assert_close(gmix, want_mix.sum((0, 1)) if shared else want_mix, atol=1e-12, rtol=1e-12)
    assert torch.equal(gphi, torch.zeros_like(phi))  # the coefficients are not in the layer input
    # next_pre_mix: mhc_coeffs' h_pre, differentiable through the coefficients only.
    h_pre = reference.mhc_coeffs(x, phi, alpha, bias)[0]
    assert torch.equal(next_pre, h_pre)
    w = torch.randn_like(next_pre)
    gx_n, gmix_n = torch.autograd.grad(next_pre, (x, pre_mix), w, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(gx_n, torch.autograd.grad(h_pre, x, w)[0], atol=0, rtol=0)
    assert torch.equal(gmix_n, torch.zeros_like(pre_mix))
    assert torch.equal(y, reference.stream_aggregate(x, pre_mix))
    for a, b in zip((h_post, h_res), reference.mhc_pre(x, phi, alpha, bias)[1:]):
        assert torch.equal(a, b)


def test_reference_post_pre_shifted_is_the_composition():
    f, x, h_post, h_res, pre_mix, phi, alpha, bias = _tensors(_post_pre_inputs((5,), 4, 7, "cpu", torch.float64))
    out = reference.mhc_post_pre_shifted(f, x, h_post, h_res, pre_mix, phi, alpha, bias, 7)
    x_next = reference.stream_mix_expand(f, x, h_post, h_res)
    want = (x_next, *reference.mhc_pre_shifted(x_next, pre_mix, phi, alpha, bias, 7))
    assert len(out) == 5
    for a, b in zip(out, want):
        assert torch.equal(a, b)


def test_initial_pre_mix_is_e0():
    e0 = reference.shifted_initial_pre_mix(4)
    assert torch.equal(e0, torch.eye(4)[0]) and e0.dtype == torch.float32
    assert reference.shifted_initial_pre_mix(3, torch.float64).dtype == torch.float64
    x = torch.randn(5, 4, 7)
    assert torch.equal(reference.stream_aggregate(x, e0), x[:, 0])


# ---------------------------------------------------------------------------------------
# Parity: ops = reference, every output and every gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
@pytest.mark.parametrize("lead", list(LEADS))
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("n", NS)
def test_pre_shifted_matches_reference(device, n, C, lead, shared, dtype):
    _check_pre(_pre_inputs(LEADS[lead], n, C, device, dtype, shared=shared))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
@pytest.mark.parametrize("lead", list(LEADS))
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("n", NS)
def test_post_pre_shifted_matches_reference(device, n, C, lead, shared, dtype):
    _check_post_pre(_post_pre_inputs(LEADS[lead], n, C, device, dtype, shared=shared))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_strided_inputs(device, dtype):
    # x [..., C, n] seen as [..., n, C]; pre_mix (and f) with inner stride 2; other scalars.
    inputs = _pre_inputs((5,), 4, 16, device, dtype, x_layout="transposed", mix_layout="sliced")
    assert not inputs[0].tensor().is_contiguous() and not inputs[1].tensor().is_contiguous()
    _check_pre(inputs, 7, 1e-5, 1e-4, 1e-3, 1.0)  # iters, norm_eps, sinkhorn_eps, pre_eps, post_mult
    inputs = _post_pre_inputs((2, 3), 3, 16, device, dtype, f_layout="sliced", mix_layout="sliced")
    _check_post_pre(inputs, 7, 1e-5, 1e-4, 1e-3, 1.0)


def test_e0_pre_mix_collapses_stream_0(device):
    # π_0 = e_0 (torch.eye(n)[0], shared): the layer input is stream 0, exactly.
    x, _, phi, alpha, bias = _tensors(_pre_inputs((2, 3), 4, 16, device))
    e0 = torch.eye(4, device=device)[0]
    y, h_post, h_res, next_pre = hcext.ops.mhc_pre_shifted(x, e0, phi, alpha, bias)
    assert torch.equal(y, x[..., 0, :])
    want = hcext.ops.mhc_coeffs(x, phi, alpha, bias)
    for a, b in zip((next_pre, h_post, h_res), want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("n,C", [(1, 7), (4, 64), (8, 7), (4, 1280)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams(device, dtype, n, C):
    # helpers' low-precision rule: the op's error against the fp64 reference is at most twice
    # the error of the reference run on the same bf16 / fp16 inputs (plus the fp32 atol).
    # 64 tokens: the rule compares maxima, and over a handful of elements (n = 1: grad_h_res
    # has one per token) the ratio of two maxima of rounding errors is noisy: with 6 tokens,
    # about 2% of random draws exceed 2x for mhc_post_pre and mhc_post_pre_shifted alike
    # (both round x_next's summed gradient once, then run the mix's backward on it).
    got, _ = _check_pre(_pre_inputs((64,), n, C, device, dtype))
    assert got.outs[0].dtype == dtype and got.grads["x"].dtype == dtype and got.grads["pre_mix"].dtype == torch.float32
    got, _ = _check_post_pre(_post_pre_inputs((64,), n, C, device, dtype, shared=n == 4))
    assert got.outs[0].dtype == dtype and got.outs[1].dtype == dtype and got.grads["pre_mix"].dtype == torch.float32


# ---------------------------------------------------------------------------------------
# gradcheck, opcheck


@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
@pytest.mark.parametrize("n,C", [(1, 2), (3, 2), (4, 2), (4, 5)])
def test_gradcheck(device, n, C, shared):
    fast = n * C > 8  # the full Jacobian of phi [n*C, n*n+2n] is slow; fast mode checks random projections
    pre = [t.requires_grad_(True) for t in _tensors(_pre_inputs((2,), n, C, device, torch.float64, shared=shared))]
    assert torch.autograd.gradcheck(lambda *a: hcext.ops.mhc_pre_shifted(*a, sinkhorn_iters=3), pre, fast_mode=fast)
    post = [t.requires_grad_(True) for t in
            _tensors(_post_pre_inputs((2,), n, C, device, torch.float64, shared=shared))]
    assert torch.autograd.gradcheck(lambda *a: hcext.ops.mhc_post_pre_shifted(*a, sinkhorn_iters=3), post,
                                    fast_mode=fast)


def _pre_samples(device):
    yield "fp32", _tensors(_pre_inputs((3,), 4, 8, device))
    yield "bf16", _tensors(_pre_inputs((5,), 4, 8, device, torch.bfloat16))
    yield "fp64-shared", _tensors(_pre_inputs((2,), 3, 5, device, torch.float64, shared=True))
    yield "empty", _tensors(_pre_inputs((0,), 4, 8, device))
    yield "strided", _tensors(_pre_inputs((4,), 3, 8, device, x_layout="transposed", mix_layout="sliced"))
    yield "lead=(2,3),n=1", _tensors(_pre_inputs((2, 3), 1, 6, device))


def _post_pre_samples(device):
    yield "fp32", _tensors(_post_pre_inputs((3,), 4, 8, device))
    yield "bf16", _tensors(_post_pre_inputs((5,), 4, 8, device, torch.bfloat16))
    yield "fp64-shared", _tensors(_post_pre_inputs((2,), 3, 5, device, torch.float64, shared=True))
    yield "empty", _tensors(_post_pre_inputs((0,), 4, 8, device))
    yield "strided", _tensors(_post_pre_inputs((4,), 3, 8, device, f_layout="sliced", mix_layout="sliced"))
    yield "lead=(2,3),n=1", _tensors(_post_pre_inputs((2, 3), 1, 6, device))


SAMPLES = [name for name, _ in _pre_samples("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("op", ["mhc_pre_shifted", "mhc_pre_shifted_fwd"])
def test_opcheck_pre_shifted(device, op, name, requires_grad):
    run_opcheck(_op(op), (*dict(_pre_samples(device))[name], 5), requires_grad=requires_grad)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("op", ["mhc_post_pre_shifted", "mhc_post_pre_shifted_fwd"])
def test_opcheck_post_pre_shifted(device, op, name, requires_grad):
    run_opcheck(_op(op), (*dict(_post_pre_samples(device))[name], 5), requires_grad=requires_grad)


def _shifted_backward_args(inputs, present=(True, True, True, True)):
    """mhc_shifted_backward(x, pre_mix, phi, alpha, bias, proj, rstd, grad_layer_input,
    grad_next_pre_mix, grad_h_post, grad_h_res, sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult)."""
    x, pre_mix, phi, alpha, bias = inputs
    y, h_post, h_res, next_pre, proj, rstd = _op("mhc_pre_shifted_fwd")(*inputs, 5)
    grads = [torch.randn_like(t) if p else None for t, p in zip((y, next_pre, h_post, h_res), present)]
    return (x, pre_mix, phi, alpha, bias, proj, rstd, *grads, 5, 1e-6, 1e-6, 2.0)


def _post_pre_backward_args(inputs, present=(True,) * 5, mask=(True,) * 5):
    """mhc_post_pre_shifted_backward(grad_x_next, grad_layer_input, grad_h_post_next,
    grad_h_res_next, grad_next_pre_mix, f, x, h_post, h_res, pre_mix, x_next, phi, alpha, bias,
    proj, rstd, sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult, output_mask)."""
    f, x, h_post, h_res, pre_mix, phi, alpha, bias = inputs
    x_next, y, hp, hr, next_pre, proj, rstd = _op("mhc_post_pre_shifted_fwd")(*inputs, 5)
    grads = [torch.randn_like(t) if p else None for t, p in zip((x_next, y, hp, hr, next_pre), present)]
    return (*grads, f, x, h_post, h_res, pre_mix, x_next, phi, alpha, bias, proj, rstd, 5, 1e-6, 1e-6, 2.0, list(mask))


@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck_backward(device, name):
    pre = dict(_pre_samples(device))[name]
    run_opcheck(_op("mhc_shifted_backward"), _shifted_backward_args(pre))
    run_opcheck(_op("mhc_shifted_backward"), _shifted_backward_args(pre, (True, False, False, True)))
    post = dict(_post_pre_samples(device))[name]
    run_opcheck(_op("mhc_post_pre_shifted_backward"), _post_pre_backward_args(post))
    run_opcheck(_op("mhc_post_pre_shifted_backward"),
                _post_pre_backward_args(post, (True, False, True, False, True), (False, True, True, False, True)))


def test_schemas():
    # The API the modules and these tests rely on.
    def args(name):
        return [a.name for a in _op(name)._schema.arguments]

    scalars = ["sinkhorn_iters", "norm_eps", "sinkhorn_eps", "pre_eps", "post_mult"]
    assert args("mhc_pre_shifted") == ["x", "pre_mix", "phi", "alpha", "bias", *scalars]
    assert args("mhc_pre_shifted_fwd") == ["x", "pre_mix", "phi", "alpha", "bias", *scalars]
    assert args("mhc_post_pre_shifted") == ["f", "x", "h_post", "h_res", "pre_mix", "phi", "alpha", "bias", *scalars]
    assert len(_op("mhc_pre_shifted")._schema.returns) == 4
    assert len(_op("mhc_post_pre_shifted")._schema.returns) == 5
    assert "pre_mix" in args("mhc_shifted_backward") and "pre_mix" in args("mhc_post_pre_shifted_backward")


def test_autograd_saves_no_stream_sized_intermediate(device):
    T, n, C = 16, 4, 64
    inputs = [t.requires_grad_(True) for t in _tensors(_post_pre_inputs((T,), n, C, device, torch.bfloat16))]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = hcext.ops.mhc_post_pre_shifted(*inputs)
    live = {t.data_ptr() for t in (*inputs, outs[0])}
    extra = [(tuple(t.shape), t.dtype) for t in saved if t.data_ptr() not in live]
    # proj [T, n*n+2n] and rstd [T], fp32: no [..., n, C] tensor, no Sinkhorn history
    assert sorted(math.prod(s) for s, _ in extra) == [T, T * _width(n)], extra


# ---------------------------------------------------------------------------------------
# torch.compile: a V4.1 chain of three sub-layers with Linear branches


def _chain(x, w, *layer_params):
    n = x.shape[-2]
    e0 = (torch.arange(n, device=x.device) == 0).to(torch.float32)  # π_0 = e_0
    y, h_post, h_res, pre = hcext.ops.mhc_pre_shifted(x, e0, *layer_params[0], sinkhorn_iters=5)
    for params in layer_params[1:]:
        x, y, h_post, h_res, pre = hcext.ops.mhc_post_pre_shifted(
            torch.tanh(y @ w), x, h_post, h_res, pre, *params, sinkhorn_iters=5
        )
    x = hcext.ops.stream_mix_expand(torch.tanh(y @ w), x, h_post, h_res)
    return hcext.ops.stream_aggregate(x, pre)


def _chain_inputs(tokens, n, C, device):
    x = torch.randn(tokens, n, C, device=device)
    w = torch.randn(C, C, device=device) / math.sqrt(C)
    return x, w, [tuple(_params(n, C, device, torch.float32)) for _ in range(3)]


def _compare_chain(fn, x, w, layers):
    def run(f):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, *[p for lp in layers for p in lp])]
        grouped = [tuple(leaves[2 + 3 * i: 5 + 3 * i]) for i in range(len(layers))]
        out = f(leaves[0], leaves[1], *grouped)
        return out, torch.autograd.grad(out.square().sum(), leaves)

    out, grads = run(fn)
    ref_out, ref_grads = run(_chain)
    assert_scaled_close(out, ref_out, scale=None)
    for g, ref in zip(grads, ref_grads):
        assert_scaled_close(g, ref)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_matches_eager(device, fresh_dynamo, backend):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_chain, backend=counter, fullgraph=True)
    _compare_chain(compiled, *_chain_inputs(6, 4, 16, device))
    assert counter.frame_count == 1


def test_compile_dynamic_tokens_do_not_recompile(device, fresh_dynamo):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_chain, backend=counter, fullgraph=True, dynamic=True)
    _, w, layers = _chain_inputs(5, 4, 8, device)
    _compare_chain(compiled, torch.randn(5, 4, 8, device=device), w, layers)
    frames = counter.frame_count
    with torch.compiler.set_stance("fail_on_recompile"):
        for tokens in (11, 29):
            _compare_chain(compiled, torch.randn(tokens, 4, 8, device=device), w, layers)
    assert counter.frame_count == frames


def test_compile_inductor(device, fresh_dynamo):
    compiled = torch.compile(_chain, backend="inductor", fullgraph=True, dynamic=True)
    # Token counts unlike the other sizes (3 = alpha's length, n, C, n*C, n*n+2n): duck shaping.
    x, w, layers = _chain_inputs(5, 2, 4, device)
    _compare_chain(compiled, x, w, layers)
    with torch.compiler.set_stance("fail_on_recompile"):
        _compare_chain(compiled, torch.randn(7, 2, 4, device=device), w, layers)


# ---------------------------------------------------------------------------------------
# Bad pre_mix: a RuntimeError naming pre_mix, eagerly, in the fake kernels and under compile


def _bad_pre_mix_cases(op):
    """BadCases of ``op`` ("mhc_pre_shifted" / "mhc_post_pre_shifted"): valid inputs at
    (2,), n = 4, C = 8 (made on the CPU, then moved to the device: meta too) with pre_mix
    replaced."""
    index = 1 if op == "mhc_pre_shifted" else 4

    def case(name, replacement, match):
        def make(d):
            make_inputs = _pre_inputs if op == "mhc_pre_shifted" else _post_pre_inputs
            inputs = [t.to(d) for t in _tensors(make_inputs((2,), 4, 8, "cpu"))]
            inputs[index] = replacement(d)
            return sample(*inputs)

        return BadCase(name, make, match)

    def randn(*shape, dtype=torch.float32):
        return lambda d: torch.randn(*shape, device=d, dtype=dtype)

    return [
        case("n+1", randn(2, 5), r"pre_mix of shape"),
        case("shared-n+1", randn(5), r"pre_mix of shape"),
        case("wrong-lead", randn(3, 4), r"pre_mix of shape"),
        case("matrix", randn(4, 4), r"pre_mix of shape"),
        case("fp64", randn(2, 4, dtype=torch.float64), r"pre_mix to be"),
        case("bf16", randn(4, dtype=torch.bfloat16), r"pre_mix to be"),
    ]


BAD = {op: {c.id: c for c in _bad_pre_mix_cases(op)} for op in ("mhc_pre_shifted", "mhc_post_pre_shifted")}
BAD_IDS = [(op, c) for op in BAD for c in BAD[op]]


def _prefix(op):
    return rf"hcext::{op}\w*: .*"


@pytest.mark.parametrize("entry", ["op", "wrapper"])
@pytest.mark.parametrize("op,case", BAD_IDS)
def test_bad_pre_mix_raises(device, op, case, entry):
    fn = _op(op) if entry == "op" else getattr(hcext.ops, op)
    assert_rejects(fn, BAD[op][case], device, prefix=_prefix(op))


@pytest.mark.parametrize("op,case", BAD_IDS)
def test_bad_pre_mix_raises_in_fake_kernel(op, case):
    assert_rejects(_op(op), BAD[op][case], "meta", prefix=_prefix(op))


@pytest.mark.parametrize("op,case", [("mhc_pre_shifted", "n+1"), ("mhc_pre_shifted", "fp64"),
                                     ("mhc_post_pre_shifted", "wrong-lead"), ("mhc_post_pre_shifted", "bf16")])
def test_bad_pre_mix_raises_under_compile(fresh_dynamo, op, case):
    fn = torch.compile(getattr(hcext.ops, op), backend="aot_eager", fullgraph=True)
    s = BAD[op][case].make("cpu")
    with pytest.raises(Exception, match=r"pre_mix") as info:
        fn(*s.args)
    assert isinstance(info.value, RuntimeError), type(info.value)


@requires_cuda
def test_pre_mix_on_another_device_raises():
    x, pre_mix, *params = [t.cuda() for t in _tensors(_pre_inputs((2,), 4, 8, "cpu"))]
    with pytest.raises(RuntimeError, match=r"pre_mix"):
        hcext.ops.mhc_pre_shifted(x, pre_mix.cpu(), *params)
    f, x, h_post, h_res, pre_mix, *params = [t.cuda() for t in _tensors(_post_pre_inputs((2,), 4, 8, "cpu"))]
    with pytest.raises(RuntimeError, match=r"pre_mix"):
        hcext.ops.mhc_post_pre_shifted(f, x, h_post, h_res, pre_mix.cpu(), *params)


# ---------------------------------------------------------------------------------------
# Modules: HyperConnection(collapse="shifted"), HyperConnectionStack(collapse="shifted")

D, N = 16, 4


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.fc, self.out = nn.RMSNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h):
        return self.out(F.gelu(self.fc(self.norm(h))))


class Attention(nn.Module):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.norm, self.heads = nn.RMSNorm(dim), heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, h):
        b, s, c = h.shape
        q, k, v = self.qkv(self.norm(h)).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, c))


def _stack(L=4, perturb=0.3, dtype=torch.float32, **kwargs):
    """A shifted stack of attention / MLP sub-layers with every parameter perturbed (token-dependent
    coefficients, distinct streams)."""
    branches = [Attention(D) if i % 2 == 0 else MLP(D) for i in range(L)]
    kwargs.setdefault("recompute_block", None)
    stack = HyperConnectionStack.from_branches(branches, D, N, collapse="shifted", sinkhorn_iters=7, **kwargs)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(perturb * torch.randn_like(p))
    return stack.to(dtype)


def _streams(dtype=torch.float32, B=2, S=5):
    return (expand_streams(torch.randn(B, S, D), N) + 0.3 * torch.randn(B, S, N, D)).to(dtype)


def _plain_coeffs(x, phi, alpha, bias, iters, eps=1e-6):
    """mHC's coefficients in plain PyTorch (written here, independent of hcext.reference)."""
    n, C = x.shape[-2:]
    xf = x.flatten(-2)
    logits = (xf @ phi) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid(alpha[0] * logits[..., :n] + bias[:n]) + eps
    post = 2 * torch.sigmoid(alpha[1] * logits[..., n:2 * n] + bias[n:2 * n])
    M = torch.softmax((alpha[2] * logits[..., 2 * n:] + bias[2 * n:]).unflatten(-1, (n, n)), dim=-2) + eps
    M = M / (M.sum(-1, keepdim=True) + eps)
    for _ in range(iters - 1):
        M = M / (M.sum(-2, keepdim=True) + eps)
        M = M / (M.sum(-1, keepdim=True) + eps)
    return pre, post, M  # M[dst, src]


def plain_v41_chain(stack, x):
    """DeepSeek-V4.1 in plain PyTorch: y_k = Σ_i π_k[i] X_k[i] (π_0 = e_0, π_k = pre_{k-1}),
    X_{k+1} = post_k ⊗ F_k(y_k) + comb_kᵀ X_k (hcext: H_res[dst, src] = comb[src, dst]),
    output Σ_i pre_{L-1}[i] X_L[i]."""
    pi = torch.zeros(x.shape[-2], dtype=x.dtype)
    pi[0] = 1
    for layer in stack.layers:
        pre, post, H = _plain_coeffs(x, layer.phi, layer.alpha, layer.bias, layer.sinkhorn_iters)
        y = (pi.unsqueeze(-1) * x).sum(-2)
        x = H @ x + post.unsqueeze(-1) * layer.branch(y).unsqueeze(-2)
        pi = pre
    return (pi.unsqueeze(-1) * x).sum(-2)


def reference_v41_chain(stack, x):
    """The same chain from hcext.reference's functions."""
    n = x.shape[-2]
    pi = reference.shifted_initial_pre_mix(n, x.dtype)
    for layer in stack.layers:
        args = (layer.phi, layer.alpha, layer.bias, layer.sinkhorn_iters, layer.norm_eps, layer.sinkhorn_eps,
                layer.pre_eps, layer.post_mult)
        y, h_post, h_res, pi = reference.mhc_pre_shifted(x, pi, *args)
        x = reference.stream_mix_expand(layer.branch(y), x, h_post, h_res)
    return reference.stream_aggregate(x, pi)


def _run(fn, model, x, seed=0):
    """(output, [grad of x, grads of every parameter]) of a fixed weighted-sum loss."""
    x = x.detach().clone().requires_grad_(True)
    params = list(model.parameters())
    torch.manual_seed(seed)
    out = fn(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out.detach(), list(grads)


def _assert_close_all(got, want, dtype):
    (out, grads), (out_ref, grads_ref) = got, want
    assert_scaled_close(out, out_ref, dtype, name="output")
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        assert_scaled_close(g, r, dtype, name=f"grad {i}")


def _assert_bitwise(got, want):
    (out, grads), (out_ref, grads_ref) = got, want
    assert torch.equal(out, out_ref)
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        assert torch.equal(g, r), f"gradient {i} differs (max {(g - r).abs().max().item():.3g})"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_stack_matches_plain_v41_chain_fp64(fuse):
    stack = _stack(4, dtype=torch.float64, fuse_boundaries=fuse)
    x = _streams(torch.float64)
    got = _run(lambda s: shifted_collapse(stack(s)), stack, x)
    plain = _run(lambda s: plain_v41_chain(stack, s), stack, x)
    ref = _run(lambda s: reference_v41_chain(stack, s), stack, x)
    _assert_close_all(got, plain, torch.float64)
    _assert_close_all(ref, plain, torch.float64)
    assert all(g.abs().sum() > 0 for g in got[1])  # every parameter (and x) gets a gradient


def test_stack_matches_plain_v41_chain_fp32():
    stack = _stack(4)
    x = _streams()
    _assert_close_all(_run(lambda s: shifted_collapse(stack(s)), stack, x),
                      _run(lambda s: plain_v41_chain(stack, s), stack, x), torch.float32)


def test_stack_uses_the_shifted_ops():
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "hcext":
                counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    stack = _stack(4)
    with Count():
        _run(lambda s: shifted_collapse(stack(s)), stack, _streams())
    assert counts["mhc_pre_shifted_fwd"] == 1 and counts["mhc_post_pre_shifted_fwd"] == 3
    assert counts["mhc_shifted_backward"] == 1 and counts["mhc_post_pre_shifted_backward"] == 3
    assert counts["stream_mix_expand"] == 1 and counts["stream_aggregate"] == 1
    assert counts["mhc_pre_fwd"] == counts["mhc_post_pre_fwd"] == 0


def test_single_modules_chain_like_the_stack():
    # HyperConnection(collapse="shifted") one by one: streams in, (streams, pre) out.
    stack = _stack(4, fuse_boundaries=False)
    x = _streams()

    def modules(s):
        state = s
        for layer in stack.layers:
            state = layer(state)
            assert isinstance(state, tuple) and len(state) == 2
        return shifted_collapse(*state)

    _assert_bitwise(_run(modules, stack, x), _run(lambda s: shifted_collapse(stack(s)), stack, x))
    stack.fuse_boundaries = True
    _assert_close_all(_run(modules, stack, x), _run(lambda s: shifted_collapse(stack(s)), stack, x), torch.float32)


def test_module_without_branch_and_extras():
    hc = HyperConnection(D, N, collapse="shifted")
    x = _streams()
    branch_input, add = hc(x)
    assert torch.equal(branch_input, x[..., 0, :])  # π_0 = e_0
    streams, pre = add(torch.tanh(branch_input))
    assert streams.shape == x.shape and pre.shape == x.shape[:-1]
    branch_input, add = hc((streams, pre))
    torch.testing.assert_close(branch_input, (pre.unsqueeze(-1) * streams).sum(-2))

    class WithAux(nn.Module):
        def forward(self, h):
            return torch.tanh(h), h.square().mean()

    hc = HyperConnection(D, N, collapse="shifted", branch=WithAux())
    (streams, pre), aux = hc(x)
    assert streams.shape == x.shape and aux.dim() == 0


@pytest.mark.parametrize("block", [1, 2, 3, "auto"])
def test_recompute_bitwise_equal(block):
    stack = _stack(5)
    x = _streams()
    want = _run(lambda s: shifted_collapse(stack(s)), stack, x)
    stack.recompute_block = block
    assert stack.recomputing()
    _assert_bitwise(_run(lambda s: shifted_collapse(stack(s)), stack, x), want)


def test_recompute_bitwise_equal_unfused():
    stack = _stack(4, fuse_boundaries=False)
    x = _streams()
    want = _run(lambda s: shifted_collapse(stack(s)), stack, x)
    stack.recompute_block = 3
    _assert_bitwise(_run(lambda s: shifted_collapse(stack(s)), stack, x), want)


def _compiled_run(stack, block, x, backend):
    torch._dynamo.reset()
    stack.recompute_block = block
    compiled = torch.compile(stack, backend=backend, fullgraph=True)
    return _run(lambda s: shifted_collapse(compiled(s)), stack, x)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_recompute_under_compile(fresh_dynamo, backend):
    stack = _stack(4)
    x = _streams()
    eager = _run(lambda s: shifted_collapse(stack(s)), stack, x)
    compiled = _compiled_run(stack, None, x, backend)
    compiled_rc = _compiled_run(stack, 2, x, backend)
    _assert_bitwise(compiled_rc, compiled)  # recompute changes no bit, compiled as well
    if backend == "aot_eager":  # the same ops run eagerly: bitwise
        _assert_bitwise(compiled_rc, eager)
    else:  # inductor's fused kernels round differently from eager
        _assert_close_all(compiled_rc, eager, torch.float32)


def test_init_equals_pre_norm():
    # At initialisation (phi = 0, h_pre = 1/n, h_post = 1, uniform H_res) with copied-in streams,
    # the shifted network collapses to the Pre-Norm residual network's hidden state.
    branches = [Attention(D) if i % 2 == 0 else MLP(D) for i in range(4)]
    stack = HyperConnectionStack.from_branches(branches, D, N, collapse="shifted", recompute_block=None)
    h = torch.randn(2, 5, D)
    out = shifted_collapse(stack(expand_streams(h, N)))
    ref = h
    for b in branches:
        ref = ref + b(ref)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_stacks_chain_through_the_state():
    # Two stacks of 2 sub-layers = one of 4: the second takes the first's (streams, pre).
    stack = _stack(4)
    first = HyperConnectionStack(list(stack.layers)[:2])
    second = HyperConnectionStack(list(stack.layers)[2:])
    assert first.collapse == second.collapse == "shifted"
    x = _streams()
    want = _run(lambda s: shifted_collapse(stack(s)), stack, x)
    got = _run(lambda s: shifted_collapse(second(first(s))), stack, x)
    _assert_close_all(got, want, torch.float32)  # the fused boundary 1 -> 2 is unfused here


def test_low_precision_stack_trains():
    stack = _stack(4, dtype=torch.bfloat16)
    x = _streams(torch.bfloat16)
    out, grads = _run(lambda s: shifted_collapse(stack(s)), stack, x)
    assert out.dtype == torch.bfloat16 and all(torch.isfinite(g).all() for g in grads)
    fp32 = copy.deepcopy(stack).float()
    ref, _ = _run(lambda s: plain_v41_chain(fp32, s.float()), fp32, x)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_default_collapse_is_unchanged():
    hc = HyperConnection(D, N)
    assert hc.collapse == "pre" and "collapse" not in repr(hc)
    stack = HyperConnectionStack.from_branches([MLP(D) for _ in range(2)], D, N, recompute_block=None)
    assert stack.collapse == "pre"
    out = stack(_streams())
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, N, D)


def test_argument_errors():
    with pytest.raises(ValueError, match="collapse='shifted'.*kind='mhc'"):
        HyperConnection(D, N, kind="hc", collapse="shifted")
    with pytest.raises(ValueError, match="collapse must be"):
        HyperConnection(D, N, collapse="bogus")
    pre_layer = HyperConnection(D, N, branch=MLP(D))
    shifted_layer = HyperConnection(D, N, branch=MLP(D), collapse="shifted")
    with pytest.raises(ValueError, match="collapse"):
        HyperConnectionStack([pre_layer, shifted_layer])
    with pytest.raises(ValueError, match="collapse"):
        HyperConnectionStack([shifted_layer], collapse="pre")
    with pytest.raises(ValueError, match="collapse"):
        HyperConnectionStack([shifted_layer], collapse="bogus")
    x = _streams()
    with pytest.raises(TypeError, match="collapse='shifted'"):
        pre_layer((x, x[..., 0]))
    with pytest.raises(TypeError, match="without pre"):
        shifted_collapse(x)
    with pytest.raises(TypeError, match="streams"):
        shifted_layer([x])
    with pytest.raises(ValueError, match="expected streams of shape"):
        shifted_layer(x[..., :3, :])


# ---------------------------------------------------------------------------------------
# The layer input from the projection pass


@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,C", [(1, 9), (4, 17), (6, 40), (8, 5)])
def test_layer_input_is_stream_aggregate_bitwise(device, n, C, dtype, shared):
    """Both backends write the shifted collapse's layer input in the projection pass, from the rows
    it reads (the CPU for every n; CUDA for n <= 6, by tiles of channels of every stream; the
    boundary's from the x_next it has just mixed): the same arithmetic as stream_aggregate, so
    the same bits — for mhc_pre_shifted and for mhc_post_pre_shifted."""
    T = 53  # two CUDA token tiles, the second partial; several CPU row blocks
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, n, C, generator=g).to(dtype).to(device)
    f = torch.randn(T, C, generator=g).to(dtype).to(device)
    h_post = (2 * torch.rand(T, n, generator=g)).to(cd).to(device)
    h_res = torch.rand(T, n, n, generator=g).to(cd).to(device)
    pre_mix = (torch.rand(*(() if shared else (T,)), n, generator=g) + 1e-6).to(cd).to(device)
    phi = (torch.randn(n * C, _width(n), generator=g) / math.sqrt(n * C)).to(cd).to(device)
    alpha = torch.tensor([0.7, 0.8, 0.9], dtype=cd, device=device)
    bias = (0.5 * torch.randn(_width(n), generator=g)).to(cd).to(device)
    scalars = (20, 1e-6, 1e-6, 1e-6, 2.0)
    layer_input = torch.ops.hcext.mhc_pre_shifted(x, pre_mix, phi, alpha, bias, *scalars)[0]
    assert torch.equal(layer_input, torch.ops.hcext.stream_aggregate(x, pre_mix))
    x_next, layer_input = torch.ops.hcext.mhc_post_pre_shifted(f, x, h_post, h_res, pre_mix, phi, alpha, bias,
                                                               *scalars)[:2]
    assert torch.equal(x_next, torch.ops.hcext.stream_mix_expand(f, x, h_post, h_res))
    assert torch.equal(layer_input, torch.ops.hcext.stream_aggregate(x_next, pre_mix))
