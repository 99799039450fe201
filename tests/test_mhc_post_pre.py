"""Tests of the fused layer boundary hcext::mhc_post_pre (stream_mix_expand of layer l, then
mhc_pre of layer l + 1), its autograd twin hcext::mhc_post_pre_fwd and its backward op
hcext::mhc_post_pre_backward: parity with the unfused hcext ops and with
hcext.reference.mhc_post_pre for every output and every gradient, over n, C, leading
shapes, strides, per-token and shared (static) incoming coefficients, fp64 / fp32 / bf16 /
fp16; gradcheck; opcheck; what autograd saves; the backward's optional gradients;
torch.compile of a chain of sub-layers; argument errors (also in the fake kernels).

Parity runs through the shared scaffold (helpers.check_parity). Tolerances, all from
helpers.TOLERANCES: fp32 / fp64 against the fp64 reference with the dtype's row, the atol
scaled by the tensor's largest magnitude (helpers.assert_scaled_close: the coefficient path's
grad_x cancels, see tests/test_mhc.py, so its error follows the tensor's scale, not each
element's). bf16 / fp16: helpers' low-precision rule (error vs the fp64 reference at most twice
the reference's own error in that dtype, plus the fp32 row's atol times the tensor's scale).
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference
from helpers import (
    NONCONTIGUOUS, BadCase, TOLERANCES, assert_all_rejected, assert_close_dtype, assert_rejects, check_parity, layout,
    run_opcheck, sample,
)

OP = torch.ops.hcext.mhc_post_pre.default
FWD_OP = torch.ops.hcext.mhc_post_pre_fwd.default
BACKWARD_OP = torch.ops.hcext.mhc_post_pre_backward.default

OUTPUTS = ("x_next", "layer_input", "h_post_next", "h_res_next")
INPUTS = ("f", "x", "h_post", "h_res", "phi", "alpha", "bias")


def _width(n):
    return n * n + 2 * n


def _make_inputs(lead, n, C, device, dtype=torch.float32, shared=False, f_layout="contiguous", x_layout=None):
    """[f, x, h_post, h_res, phi, alpha, bias] at realistic scales; h_res doubly stochastic. f and x
    are Inputs in the shared layouts ``f_layout`` and ``x_layout`` (default: f's) of
    helpers.LAYOUTS; tensors() of _sample(...) gives what the op sees."""
    coef = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(*lead, n, C, device=device).to(dtype)
    f = torch.randn(*lead, C, device=device).to(dtype)
    coef_lead = () if shared else lead
    h_post = 2 * torch.rand(*coef_lead, n, device=device, dtype=coef)
    h_res = reference.sinkhorn(torch.randn(*coef_lead, n, n, device=device, dtype=coef), 20)
    phi = torch.randn(n * C, _width(n), device=device, dtype=coef) / math.sqrt(n * C)
    alpha = torch.empty(3, device=device, dtype=coef).uniform_(0.01, 1.0)
    bias = torch.randn(_width(n), device=device, dtype=coef) * 0.5
    return [layout(f, f_layout), layout(x, x_layout or f_layout), h_post, h_res, phi, alpha, bias]


def _sample(inputs, *scalars):
    return sample(*inputs, *scalars, names=INPUTS)


def _tensors(*args, **kwargs):
    """_make_inputs' values as the op sees them (for direct calls)."""
    return _sample(_make_inputs(*args, **kwargs)).tensors()


def _unfused(f, x, h_post, h_res, phi, alpha, bias, *scalars):
    x_next = hcext.ops.stream_mix_expand(f, x, h_post, h_res)
    return (x_next, *hcext.ops.mhc_pre(x_next, phi, alpha, bias, *scalars))


def _check(inputs, *scalars):
    """The fused op against the reference (in fp64) and, for fp32 inputs, against the unfused
    hcext ops (in the op's dtype): every output and every gradient, through the shared runner."""
    s = _sample(inputs, *scalars)
    got, ref = check_parity(OP, reference.mhc_post_pre, s, out_names=OUTPUTS)
    for name, g, t in zip(INPUTS, got.grads.values(), s.tensors()):
        assert g.dtype == t.dtype, name
    if s.tensors()[1].dtype != torch.float32:
        return got, ref, None
    _, un = check_parity(OP, _unfused, s, reference_dtype=None, got=got, out_names=OUTPUTS)
    for name, o, u in zip(OUTPUTS, got.outs, un.outs):
        assert o.dtype == u.dtype, name
    # The fused pass writes x_next with the unfused mix kernel's arithmetic: bitwise equal.
    assert torch.equal(got.outs[0], un.outs[0])
    return got, ref, un


LEADS = {"lead=(0,)": (0,), "lead=(5,)": (5,), "lead=(2,3)": (2, 3)}
NC_GRID = [(1, 1), (2, 7), (3, 7), (4, 1), (4, 64), (8, 7)]


# ---------------------------------------------------------------------------------------
# Parity: fused op = unfused hcext ops = reference


@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
@pytest.mark.parametrize("lead", list(LEADS))
@pytest.mark.parametrize("n,C", NC_GRID)
def test_matches_reference_fp32(device, n, C, lead, shared):
    _check(_make_inputs(LEADS[lead], n, C, device, shared=shared))


# Token counts across the CPU backward pass's blocks (24 tokens; grad_phi's chunks of 264), not
# multiples of the epilogue's 8 lanes, with the shared coefficients' fixed-order token sums (fp32:
# in bf16 a shared coefficient's gradient sums hundreds of tokens' bf16-rounded terms, whose error
# against fp64 is random noise as large as the bf16 reference's own, beyond what the
# low-precision rule's 2x bounds; the slicing tests of tests/test_mhc_passes.py check bf16's
# blocks bitwise).
@pytest.mark.parametrize("dtype,shared", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32-per-token", "fp32-shared", "bf16-per-token"])
@pytest.mark.parametrize("T,n,C", [(97, 4, 24), (611, 1, 5), (301, 16, 3)])
def test_matches_reference_across_token_blocks(device, T, n, C, dtype, shared):
    _check(_make_inputs((T,), n, C, device, dtype=dtype, shared=shared))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,C", [(1, 17), (4, 17), (4, 300), (6, 41), (8, 9)])
def test_x_next_is_stream_mix_expand_bitwise(device, n, C, dtype):
    # The fused op writes x_next inside its projection pass (the CPU: row by row; CUDA, n <= 6: tiles
    # of channels of every stream, split over channels, C tails across splits) with the mix's own
    # arithmetic: the same bits as stream_mix_expand in every dtype, per-token and shared coefficients.
    for shared in (False, True):
        f, x, h_post, h_res, phi, alpha, bias = _tensors((37,), n, C, device, dtype=dtype, shared=shared)
        fused = OP(f, x, h_post, h_res, phi, alpha, bias)[0]
        assert torch.equal(fused, hcext.ops.stream_mix_expand(f, x, h_post, h_res)), shared


@pytest.mark.parametrize("kind", ["sliced", "transposed", "lead-permuted", "expanded", "offset"])
def test_layouts(device, kind):
    # The streams f and x in each shared layout (helpers.LAYOUTS).
    inputs = _make_inputs((2, 3), 4, 16, device, f_layout=kind)
    if kind in NONCONTIGUOUS:
        assert not inputs[0].tensor().is_contiguous() and not inputs[1].tensor().is_contiguous()
    _check(inputs)


@pytest.mark.parametrize("n,C", [(1, 3), (3, 7), (4, 16)])
def test_matches_reference_fp64_noncontiguous(device, n, C):
    # f with inner stride 2, x [..., C, n] seen as [..., n, C]; other scalars.
    inputs = _make_inputs((5,), n, C, device, dtype=torch.float64, f_layout="sliced", x_layout="transposed")
    assert not inputs[0].tensor().is_contiguous() and (n == 1 or not inputs[1].tensor().is_contiguous())
    _check(inputs, 7, 1e-5, 1e-4, 1e-3, 1.0)  # iters, norm_eps, sinkhorn_eps, pre_eps, post_mult


@pytest.mark.parametrize("n,C", [(1, 7), (4, 64), (3, 7), (4, 1280)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams(device, dtype, n, C):
    got, _, _ = _check(_make_inputs((6,), n, C, device, dtype=dtype))
    assert got.outs[0].dtype == dtype and got.outs[1].dtype == dtype
    grads = list(got.grads.values())
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[4].dtype == torch.float32


def test_rstd_is_of_the_stored_streams(device):
    # bf16: the next layer's statistics come from x_next as stored (rounded), exactly as an
    # unfused mhc_pre would read it back.
    inputs = _tensors((9,), 4, 64, device, dtype=torch.bfloat16)
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
    inputs = [t.requires_grad_(True) for t in _tensors((2,), n, C, device, torch.float64, shared=shared)]
    assert torch.autograd.gradcheck(lambda *a: hcext.ops.mhc_post_pre(*a, sinkhorn_iters=3), inputs)


def _samples(device):
    yield "fp32", _tensors((3,), 4, 8, device)
    yield "bf16", _tensors((5,), 4, 8, device, dtype=torch.bfloat16)
    yield "fp64-shared", _tensors((2,), 3, 5, device, dtype=torch.float64, shared=True)
    yield "empty", _tensors((0,), 4, 8, device)
    yield "noncontiguous", _tensors((4,), 3, 8, device, f_layout="sliced", x_layout="transposed")
    yield "expanded-offset", _tensors((4,), 3, 8, device, f_layout="expanded", x_layout="offset")
    yield "lead=(2,3),n=1", _tensors((2, 3), 1, 6, device)


SAMPLES = [name for name, _ in _samples("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("op", [OP, FWD_OP], ids=["mhc_post_pre", "mhc_post_pre_fwd"])
def test_opcheck_forward(device, op, name, requires_grad):
    run_opcheck(op, (*dict(_samples(device))[name], 5), requires_grad=requires_grad)


def _backward_args(inputs, present=(True, True, True, True), mask=(True, True, True, True)):
    f, x, h_post, h_res, phi, alpha, bias = inputs
    x_next, layer_input, h_post_next, h_res_next, proj, rstd = FWD_OP(*inputs, 5)
    grads = [torch.randn_like(t) if p else None for t, p in zip((x_next, layer_input, h_post_next, h_res_next), present)]
    return (*grads, f, x, h_post, h_res, x_next, phi, alpha, bias, proj, rstd, 5, 1e-6, 1e-6, 2.0, list(mask))


@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck_backward(device, name):
    inputs = dict(_samples(device))[name]
    run_opcheck(BACKWARD_OP, _backward_args(inputs))
    run_opcheck(BACKWARD_OP, _backward_args(inputs, (True, False, False, True), (False, True, True, False)))


@pytest.mark.parametrize(
    "present", [(True, False, False, False), (False, True, False, False), (False, False, True, True),
                (False, False, False, False)]
)
def test_backward_none_equals_zeros(request, device, present):
    inputs = _tensors((5,), 4, 8, device)
    args = list(_backward_args(inputs, present))
    zeros = [a if a is not None else torch.zeros_like(o) for a, o in zip(args[:4], FWD_OP(*inputs, 5)[:4])]
    with_none = BACKWARD_OP(*args)
    with_zeros = BACKWARD_OP(*zeros, *args[4:])
    # Without any coefficient gradient the mix's backward is stream_mix_expand_backward's kernel;
    # with one (zeros here), it runs inside the coefficient path's pass. On the CPU that is the
    # same kernel (the same bits); CUDA's pass sums h_post's and h_res's gradients over blocks of
    # channels, the streams kernel over threads: the same terms in another fixed order.
    split_sums = request.node.callspec.params["device"] != "cpu" and present == (True, False, False, False)
    for k, (a, b) in enumerate(zip(with_none, with_zeros)):
        if split_sums and k in (2, 3):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        else:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("tokens", [5, 300])  # 300: across the CPU backward pass's blocks and chunks
def test_backward_output_mask(device, tokens):
    inputs = _tensors((tokens,), 4, 8, device)
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
    inputs = [t.requires_grad_(True) for t in _tensors((T,), n, C, device, dtype=torch.bfloat16)]
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


def _chain(x, w, *layer_params):
    # layer 0: mhc_pre; boundaries 0->1, 1->2: mhc_post_pre; layer 2 ends with stream_mix_expand.
    y, h_post, h_res = hcext.ops.mhc_pre(x, *layer_params[0], sinkhorn_iters=5)
    for params in layer_params[1:]:
        x, y, h_post, h_res = hcext.ops.mhc_post_pre(torch.tanh(y @ w), x, h_post, h_res, *params, sinkhorn_iters=5)
    return hcext.ops.stream_mix_expand(torch.tanh(y @ w), x, h_post, h_res)


def _chain_inputs(tokens, n, C, device):
    x = torch.randn(tokens, n, C, device=device)
    w = torch.randn(C, C, device=device) / math.sqrt(C)
    layers = [tuple(_tensors((1,), n, C, device)[4:]) for _ in range(3)]
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
    """BadCases: the valid inputs _make_inputs((2,), 4, 8) (made on the CPU, then moved to the
    device: meta too) with the input at an index replaced."""

    def replace(name, index, replacement, match):
        def make(d):
            inputs = [t.to(d) for t in _tensors((2,), 4, 8, "cpu")]
            inputs[index] = replacement(d)
            return sample(*inputs)

        return BadCase(name, make, match)

    def randn(*shape, dtype=torch.float32):
        return lambda d: torch.randn(*shape, device=d, dtype=dtype)

    return [
        replace("f-C", 0, randn(2, 7), r"f's last dim \(C\) to be 8"),
        replace("f-lead", 0, randn(3, 8), r"f's leading dims to be \[2\]"),
        replace("f-dtype", 0, randn(2, 8, dtype=torch.bfloat16), r"f to have x's dtype"),
        replace("h_post-shape", 2, randn(2, 3), r"h_post of shape"),
        replace("h_post-dtype", 2, randn(2, 4, dtype=torch.float64), r"h_post to be"),
        replace("h_res-shape", 3, randn(2, 4, 3), r"h_res of shape"),
        replace("phi-shape", 4, randn(31, 24), r"phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]"),
        replace("alpha-shape", 5, randn(4), r"alpha of shape \[3\]"),
        replace("bias-shape", 6, randn(23), r"bias of shape \[n\*n\+2n\] = \[24\]"),
        replace("x-n=33", 1, randn(2, 33, 8), r"n = x.size\(-2\) in \[1, 32\], got 33"),
        replace("x-int", 1, lambda d: torch.randint(0, 5, (2, 4, 8), device=d), r"x of dtype"),
    ]


BAD_CALLS = {case.id: case for case in _bad_calls()}


@pytest.mark.parametrize("entry", ["op", "wrapper"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise(device, case, entry):
    fn = OP if entry == "op" else hcext.ops.mhc_post_pre
    assert_rejects(fn, BAD_CALLS[case], device, prefix=r"hcext::mhc_post_pre: .*")


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_in_fake_kernel(case):
    assert_rejects(OP, BAD_CALLS[case], "meta")


@pytest.mark.parametrize("scalar,value,match", [
    ("sinkhorn_iters", 0, r"sinkhorn_iters in \[1, 1048576\], got 0"),
    ("norm_eps", math.nan, r"norm_eps finite and >= 0"),
    ("post_mult", math.inf, r"post_mult finite"),
    ("pre_eps", -math.inf, r"pre_eps finite"),
])
def test_bad_scalars_raise(device, scalar, value, match):
    case = BadCase(scalar, lambda d: sample(*_tensors((2,), 4, 8, d), **{scalar: value}), match)
    assert_rejects(hcext.ops.mhc_post_pre, case, device, prefix=r"hcext::mhc_post_pre: .*")


def _bad_backward(name, index, change, match):
    """A BadCase of mhc_post_pre_backward: _backward_args for inputs (3,), 4, 8 with one changed."""

    def make(d):
        args = list(_backward_args(_tensors((3,), 4, 8, d)))
        args[index] = change(args[index])
        return sample(*args)

    return BadCase(name, make, match)


BAD_BACKWARD = [
    _bad_backward("x_next-shape", 8, lambda t: t[:2], r"expected x_next with x's shape"),
    _bad_backward("grad_x_next-dtype", 0, lambda t: t.double(), r"expected grad_x_next"),
    _bad_backward("proj-shape", 12, lambda t: t[:, :5], r".*proj"),
]


def test_backward_bad_arguments_raise(device):
    assert_all_rejected(BACKWARD_OP, BAD_BACKWARD, device, prefix=r"hcext::mhc_post_pre_backward: ")
