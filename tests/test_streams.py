"""Tests of hcext.stream_aggregate and hcext.stream_mix_expand (and their backward ops)
against hcext.reference: outputs and every gradient, per-token and shared coefficients,
fp32/fp64/bf16/fp16, any strides, gradcheck, opcheck, torch.compile and bad inputs.
"""

import itertools
import re

import pytest
import torch

import hcext
from hcext import reference

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _cuda_usable() -> bool:
    return torch.cuda.is_available() and hcext.has_cuda()


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not _cuda_usable():
        pytest.skip("CUDA device or hcext CUDA kernels not available")
    return request.param


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


def _aggregate_args(f, x, h_pre, h_post, h_res):
    return (x, h_pre)


def _mix_args(f, x, h_pre, h_post, h_res):
    return (f, x, h_post, h_res)


OPS = {
    "aggregate": (hcext.stream_aggregate, reference.stream_aggregate, _aggregate_args),
    "mix_expand": (hcext.stream_mix_expand, reference.stream_mix_expand, _mix_args),
}


def _fwd_bwd(fn, args, grad_out_seed=1):
    """Output and the gradients of every input, for a fixed random output gradient."""
    leaves = [a.detach().requires_grad_(True) for a in args]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(grad_out_seed)
    gout = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, gout, allow_unused=False)
    return [out.detach()] + [gr.detach() for gr in grads]


def _upcast(args):
    return [a.detach().to(torch.float64) for a in args]


def _check_against_reference(name, args, dtype):
    """Kernel vs reference, for the output and all gradients.

    fp32/fp64: close to the fp64 reference (rtol 1e-5 of the tensor's scale).
    bf16/fp16: error vs the fp64 reference at most twice the error of the reference
    itself run in that dtype, plus a small atol.
    """
    op, ref, _ = OPS[name]
    got = _fwd_bwd(op, args)
    want64 = _fwd_bwd(ref, _upcast(args))
    names = ["out"] + [f"grad[{i}]" for i in range(len(args))]
    if dtype in LOW_PRECISION:
        want_lp = _fwd_bwd(ref, args)
    for k, (a, w) in enumerate(zip(got, want64)):
        assert a.shape == w.shape, (names[k], a.shape, w.shape)
        assert a.dtype == (args[k - 1].dtype if k else args[1].dtype if name == "mix_expand" else args[0].dtype)
        if a.numel() == 0:
            continue
        scale = max(1.0, w.abs().max().item())
        err = (a.double() - w).abs().max().item()
        if dtype in LOW_PRECISION:
            err_ref = (want_lp[k].double() - w).abs().max().item()
            assert err <= 2 * err_ref + 1e-5 * scale, f"{names[k]}: err {err:.3g} vs reference's {err_ref:.3g}"
        else:
            assert err <= 1e-5 * scale, f"{names[k]}: err {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
@pytest.mark.parametrize("lead", [(0,), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("C", [1, 7, 64, 1280])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_parity(device, n, C, lead, shared, dtype):
    inputs = _make(lead, n, C, dtype, device, shared)
    for name, (_, _, pick) in OPS.items():
        _check_against_reference(name, pick(*inputs), dtype)


@pytest.mark.parametrize("n", [16, 32])
def test_parity_large_n(device, n):
    for shared in (False, True):
        inputs = _make((3,), n, 40, torch.float32, device, shared)
        for name, (_, _, pick) in OPS.items():
            _check_against_reference(name, pick(*inputs), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_many_tokens(device, dtype):
    """Shared-coefficient gradients summed over several reduction blocks of tokens."""
    for shared in (False, True):
        inputs = _make((600,), 4, 72, dtype, device, shared)
        for name, (_, _, pick) in OPS.items():
            _check_against_reference(name, pick(*inputs), dtype)


def _noncontiguous(t, kind):
    """The same values as t, with another layout."""
    if kind == "sliced":  # every other element of a wider last dim
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "transposed":  # physically [C, ..., n] / [C, ...]
        perm = list(range(t.dim()))
        return t.permute(perm[-1:] + perm[:-1]).contiguous().permute(perm[1:] + perm[:1])
    if kind == "offset":  # contiguous, but 1 element into the storage (misaligned)
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["sliced", "transposed", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
@pytest.mark.parametrize("n", [3, 4])
def test_noncontiguous(device, n, shared, dtype, kind):
    f, x, h_pre, h_post, h_res = _make((2, 3), n, 64, dtype, device, shared)
    f, x = _noncontiguous(f, kind), _noncontiguous(x, kind)
    if kind != "offset":
        assert not x.is_contiguous() and not f.is_contiguous()
    h_res = h_res.transpose(-1, -2).contiguous().transpose(-1, -2)  # values kept, strides changed
    args = (f, x, h_pre, h_post, h_res)
    for name, (_, _, pick) in OPS.items():
        _check_against_reference(name, pick(*args), dtype)


def test_empty_channels(device):
    f, x, h_pre, h_post, h_res = _make((2,), 4, 0, torch.float32, device, True)
    for name, (_, _, pick) in OPS.items():
        _check_against_reference(name, pick(f, x, h_pre, h_post, h_res), torch.float32)


def test_fp64(device):
    for shared in (False, True):
        inputs = _make((2, 3), 4, 9, torch.float64, device, shared)
        for name, (_, _, pick) in OPS.items():
            _check_against_reference(name, pick(*inputs), torch.float64)


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
    f, x, h_pre, h_post, h_res = _make((5,), 4, 16, torch.float32, device, True)
    x = x.requires_grad_()
    h_res = h_res.requires_grad_()
    out = hcext.stream_mix_expand(f, x, h_post, h_res)
    gx, gr = torch.autograd.grad(out.square().sum(), [x, h_res])
    xr = x.detach().requires_grad_()
    hr = h_res.detach().requires_grad_()
    out_r = reference.stream_mix_expand(f, xr, h_post, hr)
    gx_r, gr_r = torch.autograd.grad(out_r.square().sum(), [xr, hr])
    torch.testing.assert_close(gx, gx_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr, gr_r, rtol=1e-5, atol=1e-4)


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


def test_shared_grads_deterministic_cuda():
    if not _cuda_usable():
        pytest.skip("CUDA not available")
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
    s.append((_noncontiguous(f, "sliced"), _noncontiguous(x, "transposed"), h_pre, h_post, h_res))
    return s


def test_opcheck_forward(device):
    for f, x, h_pre, h_post, h_res in _opcheck_samples(device):
        for rg in (False, True):
            xa, ha = x.clone().requires_grad_(rg), h_pre.clone().requires_grad_(rg)
            torch.library.opcheck(torch.ops.hcext.stream_aggregate.default, (xa, ha))
            args = [t.clone() for t in (f, x, h_post, h_res)]
            if rg:  # mixed: h_post stays constant
                for i in (0, 1, 3):
                    args[i].requires_grad_()
            torch.library.opcheck(torch.ops.hcext.stream_mix_expand.default, tuple(args))


def test_opcheck_backward(device):
    for f, x, h_pre, h_post, h_res in _opcheck_samples(device):
        gy = torch.randn(*x.shape[:-2], x.shape[-1], device=device).to(x.dtype)
        go = torch.randn(x.shape, device=device).to(x.dtype)
        for mask in ([True, True], [False, True]):
            torch.library.opcheck(torch.ops.hcext.stream_aggregate_backward.default, (gy, x, h_pre, mask))
        for mask in ([True, True, True, True], [True, False, False, True]):
            torch.library.opcheck(
                torch.ops.hcext.stream_mix_expand_backward.default, (go, f, x, h_post, h_res, mask)
            )


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
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Bad inputs


def _bad_cases(device):
    """(description, callable, regex the message must match)."""
    f, x, h_pre, h_post, h_res = _make((2, 3), 4, 8, torch.float32, device, False)
    agg = hcext.stream_aggregate
    mix = hcext.stream_mix_expand
    gy = torch.zeros(2, 3, 8, device=device)
    go = torch.zeros(2, 3, 4, 8, device=device)
    abw = torch.ops.hcext.stream_aggregate_backward
    mbw = torch.ops.hcext.stream_mix_expand_backward
    x33 = torch.zeros(33, 8, device=device)
    return [
        ("x 1-dim", lambda: agg(torch.zeros(8, device=device), h_pre), r"expected x .*at least 2 dims"),
        ("x 1-dim mix", lambda: mix(f, torch.zeros(8, device=device), h_post, h_res), r"expected x .*at least 2"),
        ("n = 0", lambda: agg(torch.zeros(2, 0, 8, device=device), torch.zeros(0, device=device)), r"n \(x's dim"),
        ("n = 33", lambda: agg(x33, torch.zeros(33, device=device)), r"n \(x's dim -2\) in \[1, 32\]"),
        ("x int", lambda: agg(x.to(torch.int32), h_pre), r"expected x to be a floating-point"),
        ("x int mix", lambda: mix(f.int(), x.int(), h_post, h_res), r"expected x to be a floating-point"),
        ("h_pre shape", lambda: agg(x, h_pre[..., :3]), r"expected h_pre of shape"),
        ("h_pre lead", lambda: agg(x, h_pre[:1]), r"expected h_pre of shape"),
        ("h_pre shared shape", lambda: agg(x, torch.zeros(5, device=device)), r"expected h_pre of shape"),
        ("h_post shape", lambda: mix(f, x, h_post[..., :3], h_res), r"expected h_post of shape"),
        ("h_res shape", lambda: mix(f, x, h_post, h_res[..., :3]), r"expected h_res of shape"),
        ("h_res shared shape", lambda: mix(f, x, h_post, torch.zeros(4, 3, device=device)), r"expected h_res of"),
        ("h_res as vector", lambda: mix(f, x, h_post, h_post), r"expected h_res of shape"),
        ("h_pre bf16", lambda: agg(x, h_pre.bfloat16()), r"expected h_pre to be"),
        ("h_pre fp64", lambda: agg(x, h_pre.double()), r"expected h_pre to be"),
        ("h_pre fp32, x fp64", lambda: agg(x.double(), h_pre), r"expected h_pre to be"),
        ("h_pre int", lambda: agg(x, h_pre.int()), r"expected h_pre to be"),
        ("h_post fp16", lambda: mix(f, x, h_post.half(), h_res), r"expected h_post to be"),
        ("h_res fp64", lambda: mix(f, x, h_post, h_res.double()), r"expected h_res to be"),
        ("f C", lambda: mix(f[..., :7], x, h_post, h_res), r"expected f's last dim \(C\)"),
        ("f lead", lambda: mix(f[:1], x, h_post, h_res), r"expected f's leading dims"),
        ("f rank", lambda: mix(f[0], x, h_post, h_res), r"expected f's leading dims"),
        ("f dtype", lambda: mix(f.bfloat16(), x, h_post, h_res), r"expected f to have x's dtype"),
        ("agg grad shape", lambda: abw(gy[..., :7], x, h_pre), r"expected grad of shape"),
        ("agg grad dtype", lambda: abw(gy.double(), x, h_pre), r"expected grad to have x's dtype"),
        ("mix grad shape", lambda: mbw(go[:1], f, x, h_post, h_res), r"expected grad of shape"),
        ("mix grad dtype", lambda: mbw(go.half(), f, x, h_post, h_res), r"expected grad to have x's dtype"),
        ("mix bwd h_res", lambda: mbw(go, f, x, h_post, h_res[0]), r"expected h_res of shape"),
        ("agg bwd h_pre", lambda: abw(gy, x, h_pre.double()), r"expected h_pre to be"),
    ]


@pytest.mark.parametrize("device_kind", ["cpu", "cuda", "meta"])
def test_bad_inputs(device_kind):
    """Same checks (RuntimeError naming the argument) on CPU, CUDA and in the fake kernels
    (meta tensors)."""
    if device_kind == "cuda" and not _cuda_usable():
        pytest.skip("CUDA not available")
    failures = []
    for desc, fn, pattern in _bad_cases(device_kind):
        try:
            fn()
        except RuntimeError as e:
            if not re.search(pattern, str(e)):
                failures.append(f"{desc}: message {str(e)[:300]!r} does not match {pattern!r}")
        else:
            failures.append(f"{desc}: no error")
    assert not failures, "\n".join(failures)


def test_bad_devices():
    if not _cuda_usable():
        pytest.skip("CUDA not available")
    f, x, h_pre, h_post, h_res = _make((2, 3), 4, 8, torch.float32, "cuda", False)
    cases = [
        (lambda: hcext.stream_aggregate(x, h_pre.cpu()), "h_pre"),
        (lambda: hcext.stream_mix_expand(f.cpu(), x, h_post, h_res), "f"),
        (lambda: hcext.stream_mix_expand(f, x, h_post.cpu(), h_res), "h_post"),
        (lambda: hcext.stream_mix_expand(f, x, h_post, h_res.cpu()), "h_res"),
        (
            lambda: torch.ops.hcext.stream_aggregate_backward(torch.zeros(2, 3, 8), x, h_pre),
            "grad",
        ),
    ]
    for fn, name in cases:
        with pytest.raises(RuntimeError, match=rf"expected {name} on cuda"):
            fn()
