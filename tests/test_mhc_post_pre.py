"""Tests of the fused layer boundary hcext::mhc_post_pre (stream_mix_expand of layer l, then
mhc_pre of layer l + 1), its autograd twin hcext::mhc_post_pre_fwd and its backward op
hcext::mhc_post_pre_backward: parity with the unfused hcext ops and with
hcext.reference.mhc_post_pre for every output and every gradient, over n, C, leading
shapes, strides, per-token and shared (static) incoming coefficients, fp64 / fp32 / bf16 /
fp16; gradcheck; opcheck; what autograd saves; the backward's optional gradients;
torch.compile of a chain of sub-layers; argument errors (also in the fake kernels).

Tolerances: fp64 as in helpers.TOLERANCES. fp32 against the fp64 reference: every tensor
within FP32_REL of its largest magnitude (the coefficient path's grad_x cancels, see
tests/test_mhc.py, so an element-wise rtol would be meaningless there). bf16 / fp16: error
vs the fp64 reference at most twice the reference's own error in that dtype, plus
LOWP_ATOL of the tensor's largest magnitude.
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference
from helpers import TOLERANCES, assert_close_dtype

OP = torch.ops.hcext.mhc_post_pre.default
FWD_OP = torch.ops.hcext.mhc_post_pre_fwd.default
BACKWARD_OP = torch.ops.hcext.mhc_post_pre_backward.default

FP32_REL = 2e-5  # measured <= 3e-6 on this file's cases
LOWP_ATOL = 1e-3
OUTPUTS = ("x_next", "layer_input", "h_post_next", "h_res_next")
INPUTS = ("f", "x", "h_post", "h_res", "phi", "alpha", "bias")


def _width(n):
    return n * n + 2 * n


def _make_inputs(lead, n, C, device, dtype=torch.float32, shared=False, layout="contiguous"):
    """(f, x, h_post, h_res, phi, alpha, bias) at realistic scales; h_res doubly stochastic."""
    coef = torch.float64 if dtype == torch.float64 else torch.float32
    if layout == "streams-transposed":  # [..., C, n] seen as [..., n, C]
        x = torch.randn(*lead, C, n, device=device, dtype=dtype).transpose(-1, -2)
        f = torch.randn(*lead, 2 * C, device=device, dtype=dtype)[..., ::2]  # inner stride 2
    else:
        x = torch.randn(*lead, n, C, device=device).to(dtype)
        f = torch.randn(*lead, C, device=device).to(dtype)
    coef_lead = () if shared else lead
    h_post = 2 * torch.rand(*coef_lead, n, device=device, dtype=coef)
    h_res = reference.sinkhorn(torch.randn(*coef_lead, n, n, device=device, dtype=coef), 20)
    phi = torch.randn(n * C, _width(n), device=device, dtype=coef) / math.sqrt(n * C)
    alpha = torch.empty(3, device=device, dtype=coef).uniform_(0.01, 1.0)
    bias = torch.randn(_width(n), device=device, dtype=coef) * 0.5
    return [f, x, h_post, h_res, phi, alpha, bias]


def _unfused(f, x, h_post, h_res, phi, alpha, bias, *scalars):
    x_next = hcext.ops.stream_mix_expand(f, x, h_post, h_res)
    return (x_next, *hcext.ops.mhc_pre(x_next, phi, alpha, bias, *scalars))


def _run(fn, inputs, weights, *scalars):
    """Outputs and the gradients of sum(out * weight) for every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves, *scalars)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


def _weights(inputs):
    f, x, h_post, h_res = inputs[:4]
    n, C = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    dev = x.device
    return [torch.randn(*lead, n, C, device=dev, dtype=torch.float64), torch.randn(*lead, C, device=dev, dtype=torch.float64),
            torch.randn(*lead, n, device=dev, dtype=torch.float64), torch.randn(*lead, n, n, device=dev, dtype=torch.float64)]


def _to64(tensors):
    return [t.detach().double() for t in tensors]


def _assert_rel_close(name, actual, expected, rel):
    assert actual.shape == expected.shape, name
    if actual.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"


LEADS = {"lead=(0,)": (0,), "lead=(5,)": (5,), "lead=(2,3)": (2, 3)}
NC_GRID = [(1, 1), (2, 7), (3, 7), (4, 1), (4, 64), (8, 7)]


# ---------------------------------------------------------------------------------------
# Parity: fused op = unfused hcext ops = reference


@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
@pytest.mark.parametrize("lead", list(LEADS))
@pytest.mark.parametrize("n,C", NC_GRID)
def test_matches_reference_fp32(device, n, C, lead, shared):
    inputs = _make_inputs(LEADS[lead], n, C, device, shared=shared)
    weights = _weights(inputs)
    outs, grads = _run(OP, inputs, weights)
    ref_outs, ref_grads = _run(reference.mhc_post_pre, _to64(inputs), weights)
    un_outs, un_grads = _run(_unfused, inputs, weights)
    for name, o, ref, un in zip(OUTPUTS, outs, ref_outs, un_outs):
        assert o.dtype == un.dtype and o.shape == ref.shape
        _assert_rel_close(name, o, ref, FP32_REL)
        _assert_rel_close(name + " (unfused)", o, un, FP32_REL)
    # The fused pass writes x_next with the unfused mix kernel's arithmetic: bitwise equal.
    assert torch.equal(outs[0], un_outs[0])
    for name, g, ref, un in zip(INPUTS, grads, ref_grads, un_grads):
        assert g.dtype == inputs[INPUTS.index(name)].dtype and g.shape == inputs[INPUTS.index(name)].shape
        _assert_rel_close("grad_" + name, g, ref, FP32_REL)
        _assert_rel_close("grad_" + name + " (unfused)", g, un, FP32_REL)


@pytest.mark.parametrize("n,C", [(1, 3), (3, 7), (4, 16)])
def test_matches_reference_fp64_noncontiguous(device, n, C):
    inputs = _make_inputs((5,), n, C, device, dtype=torch.float64, layout="streams-transposed")
    assert not inputs[0].is_contiguous() and (n == 1 or not inputs[1].is_contiguous())
    weights = _weights(inputs)
    scalars = (7, 1e-5, 1e-4, 1e-3, 1.0)  # iters, norm_eps, sinkhorn_eps, pre_eps, post_mult
    outs, grads = _run(OP, inputs, weights, *scalars)
    ref_outs, ref_grads = _run(reference.mhc_post_pre, inputs, weights, *scalars)
    for o, ref in zip(outs, ref_outs):
        assert_close_dtype(o, ref)
    for name, g, ref in zip(INPUTS, grads, ref_grads):
        _assert_rel_close("grad_" + name, g, ref, 1e-10)


def _within_twice_reference_error(name, actual, ref64, ref_lowp):
    if actual.numel() == 0:
        return
    scale = max(ref64.abs().max().item(), 1e-30)
    err = (actual.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + LOWP_ATOL * scale, f"{name}: error {err:.3e} vs the reference's own {ref_err:.3e}"


@pytest.mark.parametrize("n,C", [(1, 7), (4, 64), (3, 7), (4, 1280)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams(device, dtype, n, C):
    inputs = _make_inputs((6,), n, C, device, dtype=dtype)
    weights = _weights(inputs)
    outs, grads = _run(OP, inputs, weights)
    lowp_outs, lowp_grads = _run(reference.mhc_post_pre, inputs, weights)
    ref_outs, ref_grads = _run(reference.mhc_post_pre, _to64(inputs), weights)
    assert outs[0].dtype == dtype and outs[1].dtype == dtype
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[4].dtype == torch.float32
    for name, o, ref, lowp in zip(OUTPUTS, outs, ref_outs, lowp_outs):
        _within_twice_reference_error(name, o, ref, lowp)
    for name, g, ref, lowp in zip(INPUTS, grads, ref_grads, lowp_grads):
        _within_twice_reference_error("grad_" + name, g, ref, lowp)


def test_rstd_is_of_the_stored_streams(device):
    # bf16: the next layer's statistics come from x_next as stored (rounded), exactly as an
    # unfused mhc_pre would read it back.
    inputs = _make_inputs((9,), 4, 64, device, dtype=torch.bfloat16)
    x_next, _, _, _, proj, rstd = FWD_OP(*inputs)
    xf = x_next.float().flatten(-2)
    expected = torch.rsqrt(xf.pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(rstd, expected, atol=0, rtol=2e-6)
    torch.testing.assert_close(proj, xf @ inputs[4], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# gradcheck, opcheck


@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
@pytest.mark.parametrize("n,C", [(1, 2), (3, 2), (4, 5)])
def test_gradcheck(device, n, C, shared):
    inputs = [t.requires_grad_(True) for t in _make_inputs((2,), n, C, device, torch.float64, shared=shared)]
    assert torch.autograd.gradcheck(lambda *a: hcext.ops.mhc_post_pre(*a, sinkhorn_iters=3), inputs)


def _samples(device):
    yield "fp32", _make_inputs((3,), 4, 8, device)
    yield "bf16", _make_inputs((5,), 4, 8, device, dtype=torch.bfloat16)
    yield "fp64-shared", _make_inputs((2,), 3, 5, device, dtype=torch.float64, shared=True)
    yield "empty", _make_inputs((0,), 4, 8, device)
    yield "noncontiguous", _make_inputs((4,), 3, 8, device, layout="streams-transposed")
    yield "lead=(2,3),n=1", _make_inputs((2, 3), 1, 6, device)


SAMPLES = [name for name, _ in _samples("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("op", [OP, FWD_OP], ids=["mhc_post_pre", "mhc_post_pre_fwd"])
def test_opcheck_forward(device, op, sample, requires_grad):
    args = dict(_samples(device))[sample]
    if requires_grad:
        args = [t.requires_grad_(True) for t in args]
    torch.library.opcheck(op, (*args, 5))


def _backward_args(inputs, present=(True, True, True, True), mask=(True, True, True, True)):
    f, x, h_post, h_res, phi, alpha, bias = inputs
    x_next, layer_input, h_post_next, h_res_next, proj, rstd = FWD_OP(*inputs, 5)
    grads = [torch.randn_like(t) if p else None for t, p in zip((x_next, layer_input, h_post_next, h_res_next), present)]
    return (*grads, f, x, h_post, h_res, x_next, phi, alpha, bias, proj, rstd, 5, 1e-6, 1e-6, 2.0, list(mask))


@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck_backward(device, sample):
    inputs = dict(_samples(device))[sample]
    torch.library.opcheck(BACKWARD_OP, _backward_args(inputs))
    torch.library.opcheck(BACKWARD_OP, _backward_args(inputs, (True, False, False, True), (False, True, True, False)))


@pytest.mark.parametrize(
    "present", [(True, False, False, False), (False, True, False, False), (False, False, True, True),
                (False, False, False, False)]
)
def test_backward_none_equals_zeros(device, present):
    inputs = _make_inputs((5,), 4, 8, device)
    args = list(_backward_args(inputs, present))
    zeros = [a if a is not None else torch.zeros_like(o) for a, o in zip(args[:4], FWD_OP(*inputs, 5)[:4])]
    with_none = BACKWARD_OP(*args)
    with_zeros = BACKWARD_OP(*zeros, *args[4:])
    for a, b in zip(with_none, with_zeros):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_backward_output_mask(device):
    inputs = _make_inputs((5,), 4, 8, device)
    full = BACKWARD_OP(*_backward_args(inputs))
    torch.manual_seed(1)
    args = list(_backward_args(inputs))
    torch.manual_seed(1)
    masked = BACKWARD_OP(*_backward_args(inputs, mask=(False, True, False, True)))
    unmasked = BACKWARD_OP(*args)
    assert masked[0].numel() == 0 and masked[2].numel() == 0
    assert torch.equal(masked[1], unmasked[1]) and torch.equal(masked[3], unmasked[3])
    assert all(t.numel() > 0 for t in full)


# ---------------------------------------------------------------------------------------
# What autograd saves


def test_autograd_saves_only_live_tensors_and_the_small_ones(device):
    T, n, C = 16, 4, 64
    inputs = [t.requires_grad_(True) for t in _make_inputs((T,), n, C, device, dtype=torch.bfloat16)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_next, layer_input, h_post_next, h_res_next = hcext.ops.mhc_post_pre(*inputs)
    live = {t.data_ptr() for t in (*inputs, x_next)}
    extra = [t for t in saved if t.data_ptr() not in live]
    description = [(tuple(t.shape), t.dtype) for t in extra]
    # proj [T, n*n+2n] and rstd [T], fp32: no other [..., n, C] tensor, no Sinkhorn history
    assert sorted(t.numel() for t in extra) == [T, T * _width(n)], description
    assert all(t.dtype == torch.float32 for t in extra), description
    assert any(t.data_ptr() == x_next.data_ptr() for t in saved)  # the next sub-layer's input


# ---------------------------------------------------------------------------------------
# torch.compile: a chain of three sub-layers with Linear branches


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _chain(x, w, *layer_params):
    # layer 0: mhc_pre; boundaries 0->1, 1->2: mhc_post_pre; layer 2 ends with stream_mix_expand.
    y, h_post, h_res = hcext.ops.mhc_pre(x, *layer_params[0], sinkhorn_iters=5)
    for params in layer_params[1:]:
        x, y, h_post, h_res = hcext.ops.mhc_post_pre(torch.tanh(y @ w), x, h_post, h_res, *params, sinkhorn_iters=5)
    return hcext.ops.stream_mix_expand(torch.tanh(y @ w), x, h_post, h_res)


def _chain_inputs(tokens, n, C, device):
    x = torch.randn(tokens, n, C, device=device)
    w = torch.randn(C, C, device=device) / math.sqrt(C)
    layers = [tuple(_make_inputs((1,), n, C, device)[4:]) for _ in range(3)]
    return x, w, layers


def _compare_chain(fn, x, w, layers):
    def run(f):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, *[p for lp in layers for p in lp])]
        grouped = [tuple(leaves[2 + 3 * i: 5 + 3 * i]) for i in range(len(layers))]
        out = f(leaves[0], leaves[1], *grouped)
        return out, torch.autograd.grad(out.square().sum(), leaves)

    out, grads = run(fn)
    ref_out, ref_grads = run(_chain)
    assert_close_dtype(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOLERANCES[torch.float32])


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
    compiled = torch.compile(_chain, backend="inductor", fullgraph=True)
    _compare_chain(compiled, *_chain_inputs(3, 2, 4, device))


# ---------------------------------------------------------------------------------------
# Argument errors: a RuntimeError naming the argument, from the kernels and the fake kernels


def _bad_calls():
    """(id, index of the input to replace, replacement(device), message regex); valid inputs
    are _make_inputs((2,), 4, 8)."""
    def randn(*shape, dtype=torch.float32):
        return lambda d: torch.randn(*shape, device=d, dtype=dtype)

    return [
        ("f-C", 0, randn(2, 7), r"f's last dim \(C\) to be 8"),
        ("f-lead", 0, randn(3, 8), r"f's leading dims to be \[2\]"),
        ("f-dtype", 0, randn(2, 8, dtype=torch.bfloat16), r"f to have x's dtype"),
        ("h_post-shape", 2, randn(2, 3), r"h_post of shape"),
        ("h_post-dtype", 2, randn(2, 4, dtype=torch.float64), r"h_post to be"),
        ("h_res-shape", 3, randn(2, 4, 3), r"h_res of shape"),
        ("phi-shape", 4, randn(31, 24), r"phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]"),
        ("alpha-shape", 5, randn(4), r"alpha of shape \[3\]"),
        ("bias-shape", 6, randn(23), r"bias of shape \[n\*n\+2n\] = \[24\]"),
        ("x-n=33", 1, randn(2, 33, 8), r"n = x.size\(-2\) in \[1, 32\], got 33"),
        ("x-int", 1, lambda d: torch.randint(0, 5, (2, 4, 8), device=d), r"x of dtype"),
    ]


BAD_CALLS = {case[0]: case[1:] for case in _bad_calls()}


@pytest.mark.parametrize("entry", ["op", "wrapper"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise(device, case, entry):
    index, replacement, match = BAD_CALLS[case]
    inputs = _make_inputs((2,), 4, 8, device)
    inputs[index] = replacement(device)
    fn = OP if entry == "op" else hcext.ops.mhc_post_pre
    with pytest.raises(RuntimeError, match=r"hcext::mhc_post_pre: .*" + match):
        fn(*inputs)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_in_fake_kernel(case):
    index, replacement, match = BAD_CALLS[case]
    inputs = [t.to("meta") for t in _make_inputs((2,), 4, 8, "cpu")]
    inputs[index] = replacement("meta")
    with pytest.raises(RuntimeError, match=match):
        OP(*inputs)


@pytest.mark.parametrize("scalar,value,match", [
    ("sinkhorn_iters", 0, r"sinkhorn_iters in \[1, 1048576\], got 0"),
    ("norm_eps", math.nan, r"norm_eps finite and >= 0"),
    ("post_mult", math.inf, r"post_mult finite"),
    ("pre_eps", -math.inf, r"pre_eps finite"),
])
def test_bad_scalars_raise(device, scalar, value, match):
    with pytest.raises(RuntimeError, match=r"hcext::mhc_post_pre: .*" + match):
        hcext.ops.mhc_post_pre(*_make_inputs((2,), 4, 8, device), **{scalar: value})


def test_backward_bad_arguments_raise(device):
    inputs = _make_inputs((3,), 4, 8, device)
    args = list(_backward_args(inputs))
    bad_x_next = list(args)
    bad_x_next[8] = args[8][:2]
    with pytest.raises(RuntimeError, match=r"hcext::mhc_post_pre_backward: expected x_next with x's shape"):
        BACKWARD_OP(*bad_x_next)
    bad_grad = list(args)
    bad_grad[0] = args[0].double()
    with pytest.raises(RuntimeError, match=r"hcext::mhc_post_pre_backward: expected grad_x_next"):
        BACKWARD_OP(*bad_grad)
    bad_proj = list(args)
    bad_proj[12] = args[12][:, :5]
    with pytest.raises(RuntimeError, match=r"hcext::mhc_post_pre_backward: .*proj"):
        BACKWARD_OP(*bad_proj)
