"""Tests of hcext.stream_aggregate and hcext.stream_mix_expand (and their backward ops)
against hcext.reference: outputs and every gradient, per-token and shared coefficients,
fp32/fp64/bf16/fp16, any strides, gradcheck, opcheck, torch.compile and bad inputs.
"""

import itertools

import pytest
import torch

import hcext
from hcext import reference
from helpers import (
    NONCONTIGUOUS, BadCase, Input, assert_all_rejected, assert_close_dtype, check_parity, layout,
    requires_cuda, run_opcheck, sample,
)


def _coef_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make(lead, n, C, dtype, device, shared, seed=0):
    """(f, x, h_pre, h_post, h_res): streams in `dtype`, coefficients fp32 (fp64)."""
    g = torch.Generator().manual_seed(seed)
    cl = () if shared else tuple(lead)
    cd = _coef_dtype(dtype)
    x = torch.randn(*lead, n, C, generator=g).to(dtype)
    f = torch.randn(*lead, C, generator=g).to(dtype)
    h_pre = torch.rand(*cl, n, generator=g).to(cd)
    h_post = (2 * torch.rand(*cl, n, generator=g)).to(cd)
    h_res = torch.randn(*cl, n, n, generator=g).to(cd)
    return tuple(t.to(device) for t in (f, x, h_pre, h_post, h_res))


def _aggregate_sample(f, x, h_pre, h_post, h_res):
    return sample(x, h_pre, names=["x", "h_pre"])


def _mix_sample(f, x, h_pre, h_post, h_res):
    return sample(f, x, h_post, h_res, names=["f", "x", "h_post", "h_res"])


# name -> (op, reference, the sample of (f, x, h_pre, h_post, h_res) the op takes)
OPS = {
    "aggregate": (hcext.stream_aggregate, reference.stream_aggregate, _aggregate_sample),
    "mix_expand": (hcext.stream_mix_expand, reference.stream_mix_expand, _mix_sample),
}


def _check_all_ops(f, x, h_pre, h_post, h_res):
    """Both ops against the reference (run in fp64), output and every gradient, through the
    shared runner: fp32 / fp64 within the TOLERANCES row (atol relative to the tensor's largest
    magnitude); bf16 / fp16 within twice the error of the reference run in that dtype."""
    for name, (op, ref, pick) in OPS.items():
        s = pick(f, x, h_pre, h_post, h_res)
        got, _ = check_parity(op, ref, s, out_names=["out"])
        # The output in the streams' dtype; each gradient in its input's dtype (shapes: checked
        # against the reference's).
        assert got.outs[0].dtype == s.tensors()[-3 if name == "mix_expand" else 0].dtype, name
        for (input_name, g), t in zip(got.grads.items(), s.tensors()):
            assert g.dtype == t.dtype, (name, input_name)


# ---------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
@pytest.mark.parametrize("lead", [(0,), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("C", [1, 7, 64, 1280])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_parity(device, n, C, lead, shared, dtype):
    _check_all_ops(*_make(lead, n, C, dtype, device, shared))


@pytest.mark.parametrize("n", [16, 32])
def test_parity_large_n(device, n):
    for shared in (False, True):
        _check_all_ops(*_make((3,), n, 40, torch.float32, device, shared))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_many_tokens(device, dtype):
    """Shared-coefficient gradients summed over several reduction blocks of tokens."""
    for shared in (False, True):
        _check_all_ops(*_make((600,), 4, 72, dtype, device, shared))


@pytest.mark.parametrize("kind", ["sliced", "transposed", "lead-permuted", "expanded", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
@pytest.mark.parametrize("n", [3, 4])
def test_noncontiguous(device, n, shared, dtype, kind):
    # The streams f and x in one of the shared layouts (helpers.LAYOUTS); h_res with its
    # values kept and its strides changed.
    f, x, h_pre, h_post, h_res = _make((2, 3), n, 64, dtype, device, shared)
    f, x = layout(f, kind), layout(x, kind)
    if kind in NONCONTIGUOUS:
        assert not x.tensor().is_contiguous() and not f.tensor().is_contiguous()
    _check_all_ops(f, x, h_pre, h_post, layout(h_res, "transposed"))


def test_empty_channels(device):
    _check_all_ops(*_make((2,), 4, 0, torch.float32, device, True))


def test_fp64(device):
    for shared in (False, True):
        _check_all_ops(*_make((2, 3), 4, 9, torch.float64, device, shared))


def test_contiguous_inputs_are_not_copied():
    f, x, h_pre, h_post, h_res = _make((4,), 4, 64, torch.bfloat16, "cpu", False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hcext.stream_aggregate(x, h_pre)
        hcext.stream_mix_expand(f, x, h_post, h_res)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::clone", "aten::copy_", "aten::_to_copy"}, names


# ---------------------------------------------------------------------------------------
# Backward ops: output_mask, determinism


def test_backward_output_mask(device):
    f, x, h_pre, h_post, h_res = _make((2, 3), 4, 24, torch.float32, device, False)
    gy = torch.randn(2, 3, 24, device=device)
    go = torch.randn(2, 3, 4, 24, device=device)
    full_a = torch.ops.hcext.stream_aggregate_backward(gy, x, h_pre)
    full_m = torch.ops.hcext.stream_mix_expand_backward(go, f, x, h_post, h_res)
    for mask in itertools.product([False, True], repeat=2):
        part = torch.ops.hcext.stream_aggregate_backward(gy, x, h_pre, list(mask))
        for m, p, full in zip(mask, part, full_a):
            if m:
                torch.testing.assert_close(p, full, rtol=0, atol=0)
            else:
                assert p.shape == (0,)
    for mask in itertools.product([False, True], repeat=4):
        part = torch.ops.hcext.stream_mix_expand_backward(go, f, x, h_post, h_res, list(mask))
        for m, p, full in zip(mask, part, full_m):
            if m:
                torch.testing.assert_close(p, full, rtol=0, atol=0)
            else:
                assert p.shape == (0,)


def test_partial_requires_grad(device):
    # Only x and h_res require grad: the op's backward computes those, equal to the reference's.
    f, x, h_pre, h_post, h_res = _make((5,), 4, 16, torch.float32, device, True)
    s = sample(Input(f, requires_grad=False), x, Input(h_post, requires_grad=False), h_res,
               names=["f", "x", "h_post", "h_res"])
    got, _ = check_parity(hcext.stream_mix_expand, reference.stream_mix_expand, s)
    assert list(got.grads) == ["x", "h_res"]


def test_shared_grads_deterministic():
    """Shared-coefficient gradients are reduced in a fixed order: bitwise equal whatever
    the thread count."""
    f, x, h_pre, h_post, h_res = _make((1000,), 4, 33, torch.float32, "cpu", True)
    go = torch.randn(1000, 4, 33)
    gy = torch.randn(1000, 33)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(
                torch.ops.hcext.stream_mix_expand_backward(go, f, x, h_post, h_res)[2:]
                + torch.ops.hcext.stream_aggregate_backward(gy, x, h_pre)[1:]
            )
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@requires_cuda
def test_shared_grads_deterministic_cuda():
    f, x, h_pre, h_post, h_res = _make((5000,), 4, 72, torch.bfloat16, "cuda", True)
    go = torch.randn(5000, 4, 72, device="cuda").bfloat16()
    first = torch.ops.hcext.stream_mix_expand_backward(go, f, x, h_post, h_res)
    for _ in range(3):
        again = torch.ops.hcext.stream_mix_expand_backward(go, f, x, h_post, h_res)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# gradcheck (fp64)


@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
@pytest.mark.parametrize("n", [3, 4])
def test_gradcheck(device, n, shared):
    f, x, h_pre, h_post, h_res = _make((2,), n, 5, torch.float64, device, shared)
    args_a = [t.requires_grad_() for t in (x.clone(), h_pre.clone())]
    assert torch.autograd.gradcheck(hcext.stream_aggregate, args_a)
    args_m = [t.clone().requires_grad_() for t in (f, x, h_post, h_res)]
    assert torch.autograd.gradcheck(hcext.stream_mix_expand, args_m)


# ---------------------------------------------------------------------------------------
# opcheck


def _opcheck_samples(device):
    """(f, x, h_pre, h_post, h_res) samples: per token / shared, fp32 / bf16, strided."""
    s = []
    s.append(_make((2, 3), 4, 8, torch.float32, device, False))
    s.append(_make((5,), 3, 5, torch.float32, device, True))
    f, x, h_pre, h_post, h_res = _make((2,), 4, 16, torch.bfloat16, device, False)
    s.append((layout(f, "sliced").tensor(), layout(x, "transposed").tensor(), h_pre, h_post, h_res))
    f, x, h_pre, h_post, h_res = _make((3,), 4, 8, torch.float32, device, True)
    s.append((layout(f, "expanded").tensor(), layout(x, "offset").tensor(), h_pre, h_post, h_res))
    return s


def test_opcheck_forward(device):
    for f, x, h_pre, h_post, h_res in _opcheck_samples(device):
        for rg in (False, True):
            run_opcheck(torch.ops.hcext.stream_aggregate.default, (x, h_pre), requires_grad=rg)
            # requires_grad: mixed, h_post stays constant
            run_opcheck(torch.ops.hcext.stream_mix_expand.default, (f, x, h_post, h_res),
                        requires_grad=(0, 1, 3) if rg else False)


def test_opcheck_backward(device):
    for f, x, h_pre, h_post, h_res in _opcheck_samples(device):
        gy = torch.randn(*x.shape[:-2], x.shape[-1], device=device).to(x.dtype)
        go = torch.randn(x.shape, device=device).to(x.dtype)
        for mask in ([True, True], [False, True]):
            run_opcheck(torch.ops.hcext.stream_aggregate_backward.default, (gy, x, h_pre, mask))
        for mask in ([True, True, True, True], [True, False, False, True]):
            run_opcheck(torch.ops.hcext.stream_mix_expand_backward.default, (go, f, x, h_post, h_res, mask))


# ---------------------------------------------------------------------------------------
# torch.compile


def _layer(x, h_pre, h_post, h_res, lin):
    y = hcext.stream_aggregate(x, h_pre)
    return hcext.stream_mix_expand(lin(y), x, h_post, h_res)


@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_dynamic(device, backend, shared):
    n, C = 4, 16
    torch.manual_seed(0)
    lin = torch.nn.Linear(C, C).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(_layer, backend=backend, fullgraph=True, dynamic=True)
    for i, tokens in enumerate((3, 5, 9, 17)):
        f, x, h_pre, h_post, h_res = _make((tokens,), n, C, torch.float32, device, shared, seed=tokens)
        leaves = [t.requires_grad_() for t in (x, h_pre, h_post, h_res)]
        params = list(lin.parameters())
        outs = []
        for fn in (_layer, compiled):
            if i > 0 and fn is compiled:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = fn(*leaves, lin)
            else:
                out = fn(*leaves, lin)
            grads = torch.autograd.grad(out.square().sum(), leaves + params)
            outs.append([out] + list(grads))
        for a, b in zip(*outs):
            assert_close_dtype(b, a)


# ---------------------------------------------------------------------------------------
# Bad inputs


def _bad(desc, call, pattern):
    """A BadCase whose make(device) builds valid inputs [2, 3, 4, 8] on device and returns the bad call."""

    def make(device):
        f, x, h_pre, h_post, h_res = _make((2, 3), 4, 8, torch.float32, device, False)
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return lambda: call(z, f, x, h_pre, h_post, h_res)

    return BadCase(desc, make, pattern)


agg = hcext.stream_aggregate
mix = hcext.stream_mix_expand
abw = torch.ops.hcext.stream_aggregate_backward
mbw = torch.ops.hcext.stream_mix_expand_backward

# (description, call(zeros, f, x, h_pre, h_post, h_res), regex the message must match)
BAD_CASES = [
    _bad("x 1-dim", lambda z, f, x, hp, ho, hr: agg(z(8), hp), r"expected x .*at least 2 dims"),
    _bad("x 1-dim mix", lambda z, f, x, hp, ho, hr: mix(f, z(8), ho, hr), r"expected x .*at least 2"),
    _bad("n = 0", lambda z, f, x, hp, ho, hr: agg(z(2, 0, 8), z(0)), r"n \(x's dim"),
    _bad("n = 33", lambda z, f, x, hp, ho, hr: agg(z(33, 8), z(33)), r"n \(x's dim -2\) in \[1, 32\]"),
    _bad("x int", lambda z, f, x, hp, ho, hr: agg(x.to(torch.int32), hp), r"expected x to be a floating-point"),
    _bad("x int mix", lambda z, f, x, hp, ho, hr: mix(f.int(), x.int(), ho, hr), r"expected x to be a floating-point"),
    _bad("h_pre shape", lambda z, f, x, hp, ho, hr: agg(x, hp[..., :3]), r"expected h_pre of shape"),
    _bad("h_pre lead", lambda z, f, x, hp, ho, hr: agg(x, hp[:1]), r"expected h_pre of shape"),
    _bad("h_pre shared shape", lambda z, f, x, hp, ho, hr: agg(x, z(5)), r"expected h_pre of shape"),
    _bad("h_post shape", lambda z, f, x, hp, ho, hr: mix(f, x, ho[..., :3], hr), r"expected h_post of shape"),
    _bad("h_res shape", lambda z, f, x, hp, ho, hr: mix(f, x, ho, hr[..., :3]), r"expected h_res of shape"),
    _bad("h_res shared shape", lambda z, f, x, hp, ho, hr: mix(f, x, ho, z(4, 3)), r"expected h_res of"),
    _bad("h_res as vector", lambda z, f, x, hp, ho, hr: mix(f, x, ho, ho), r"expected h_res of shape"),
    _bad("h_pre bf16", lambda z, f, x, hp, ho, hr: agg(x, hp.bfloat16()), r"expected h_pre to be"),
    _bad("h_pre fp64", lambda z, f, x, hp, ho, hr: agg(x, hp.double()), r"expected h_pre to be"),
    _bad("h_pre fp32, x fp64", lambda z, f, x, hp, ho, hr: agg(x.double(), hp), r"expected h_pre to be"),
    _bad("h_pre int", lambda z, f, x, hp, ho, hr: agg(x, hp.int()), r"expected h_pre to be"),
    _bad("h_post fp16", lambda z, f, x, hp, ho, hr: mix(f, x, ho.half(), hr), r"expected h_post to be"),
    _bad("h_res fp64", lambda z, f, x, hp, ho, hr: mix(f, x, ho, hr.double()), r"expected h_res to be"),
    _bad("f C", lambda z, f, x, hp, ho, hr: mix(f[..., :7], x, ho, hr), r"expected f's last dim \(C\)"),
    _bad("f lead", lambda z, f, x, hp, ho, hr: mix(f[:1], x, ho, hr), r"expected f's leading dims"),
    _bad("f rank", lambda z, f, x, hp, ho, hr: mix(f[0], x, ho, hr), r"expected f's leading dims"),
    _bad("f dtype", lambda z, f, x, hp, ho, hr: mix(f.bfloat16(), x, ho, hr), r"expected f to have x's dtype"),
    _bad("agg grad shape", lambda z, f, x, hp, ho, hr: abw(z(2, 3, 8)[..., :7], x, hp), r"expected grad of shape"),
    _bad("agg grad dtype", lambda z, f, x, hp, ho, hr: abw(z(2, 3, 8).double(), x, hp),
         r"expected grad to have x's dtype"),
    _bad("mix grad shape", lambda z, f, x, hp, ho, hr: mbw(z(2, 3, 4, 8)[:1], f, x, ho, hr), r"expected grad of shape"),
    _bad("mix grad dtype", lambda z, f, x, hp, ho, hr: mbw(z(2, 3, 4, 8).half(), f, x, ho, hr),
         r"expected grad to have x's dtype"),
    _bad("mix bwd h_res", lambda z, f, x, hp, ho, hr: mbw(z(2, 3, 4, 8), f, x, ho, hr[0]), r"expected h_res of shape"),
    _bad("agg bwd h_pre", lambda z, f, x, hp, ho, hr: abw(z(2, 3, 8), x, hp.double()), r"expected h_pre to be"),
]


@pytest.mark.parametrize("device_kind", ["cpu", pytest.param("cuda", marks=requires_cuda), "meta"])
def test_bad_inputs(device_kind):
    """Same checks (RuntimeError naming the argument) on CPU, CUDA and in the fake kernels
    (meta tensors)."""
    assert_all_rejected(None, BAD_CASES, device_kind)


# (description, call with one argument on the CPU, the argument the message names)
BAD_DEVICE_CASES = [
    _bad("h_pre on cpu", lambda z, f, x, hp, ho, hr: agg(x, hp.cpu()), r"expected h_pre on cuda"),
    _bad("f on cpu", lambda z, f, x, hp, ho, hr: mix(f.cpu(), x, ho, hr), r"expected f on cuda"),
    _bad("h_post on cpu", lambda z, f, x, hp, ho, hr: mix(f, x, ho.cpu(), hr), r"expected h_post on cuda"),
    _bad("h_res on cpu", lambda z, f, x, hp, ho, hr: mix(f, x, ho, hr.cpu()), r"expected h_res on cuda"),
    _bad("grad on cpu", lambda z, f, x, hp, ho, hr: abw(torch.zeros(2, 3, 8), x, hp), r"expected grad on cuda"),
]


@requires_cuda
def test_bad_devices():
    assert_all_rejected(None, BAD_DEVICE_CASES, "cuda")
