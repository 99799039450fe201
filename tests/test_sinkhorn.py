"""Tests of hcext::sinkhorn and hcext::sinkhorn_backward against hcext.reference.sinkhorn:
values and gradients, the dtype contract, the doubly-stochastic property, gradcheck,
opcheck, torch.compile (eager / aot_eager / inductor, dynamic shapes), what autograd
saves, argument errors, and CUDA vs CPU agreement.
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext.reference import sinkhorn as reference_sinkhorn
from helpers import (
    NONCONTIGUOUS, BadCase, Input, assert_close_dtype, assert_rejects, check_parity, compare_results, forward_backward,
    layout, layout_cases, requires_cuda, run_opcheck, sample,
)

OP = torch.ops.hcext.sinkhorn.default
BACKWARD_OP = torch.ops.hcext.sinkhorn_backward.default

N_VALUES = [1, 2, 3, 4, 8, 16, 32]
ITERS_VALUES = [1, 5, 20]


# ---------------------------------------------------------------------------------------
# Samples: logits [*lead, n, n] in one of the shared layouts (helpers.LAYOUTS), iters, eps

# id -> (leading shape, layout): the leading shapes contiguous, then every layout at lead (5, 3)
LAYOUT_CASES = layout_cases(
    {"lead=()": (), "lead=(0,)": (0,), "lead=(7,)": (7,), "lead=(3,5)": (3, 5)},
    ["sliced", "transposed", "lead-permuted", "expanded", "offset"],
    lead=(5, 3),
)


def _sample(values, kind="contiguous", iters=20, eps=1e-6):
    return sample(layout(values, kind), iters=iters, eps=eps, names=["logits"])


def _check_parity(values, kind="contiguous", iters=20, eps=1e-6):
    """hcext.sinkhorn vs the reference (in fp64), forward and backward, through the shared runner."""
    got, _ = check_parity(hcext.sinkhorn, reference_sinkhorn, _sample(values, kind, iters, eps), scale=None)
    (out,), grad = got.outs, got.grads["logits"]
    assert out.device == values.device
    return out, grad


# ---------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.parametrize("iters", ITERS_VALUES)
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("layout_case", list(LAYOUT_CASES))
def test_matches_reference_fp32(device, layout_case, n, iters):
    lead, kind = LAYOUT_CASES[layout_case]
    values = torch.randn(*lead, n, n, device=device)
    if kind in NONCONTIGUOUS and n > 1:
        assert not layout(values, kind).tensor().is_contiguous()  # the case tests what it says
    _check_parity(values, kind, iters)


@pytest.mark.parametrize("scale", [4.0, 20.0])
@pytest.mark.parametrize("n", [2, 4, 5, 32])
def test_matches_reference_large_logits(device, n, scale):
    # Peaked softmaxes: many entries end near eps, where the recomputed backward's
    # recovery of each step's input (x = y * d) must stay accurate.
    _check_parity(torch.randn(9, n, n, device=device) * scale, iters=20)


def test_matches_reference_with_masked_logits(device):
    # -inf logits (masked connections) give exp = 0: finite outputs and zero gradients there.
    base = torch.randn(3, 4, 4, device=device)
    base[0, 1, 2] = float("-inf")
    base[2, :, 3] = torch.tensor([0.0, float("-inf"), float("-inf"), 1.0], device=device)
    out, grad = _check_parity(base, iters=5)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert grad[0, 1, 2] == 0 and (grad[2, 1:3, 3] == 0).all()


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_matches_reference_other_eps(device, eps):
    _check_parity(torch.randn(7, 5, 5, device=device), iters=6, eps=eps)


def test_default_arguments_are_20_iters_and_eps_1e6(device):
    x = torch.randn(7, 4, 4, device=device)
    assert_close_dtype(OP(x), reference_sinkhorn(x, 20, 1e-6))
    assert_close_dtype(hcext.sinkhorn(x), reference_sinkhorn(x, 20, 1e-6))
    # and the arguments matter: fewer iterations give a different result
    assert not torch.allclose(OP(x, 1), OP(x), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [2, 4, 5, 32])
@pytest.mark.parametrize("iters", [1, 20])
def test_low_precision_computes_in_fp32(device, dtype, n, iters):
    s = _sample(torch.randn(7, n, n, device=device).to(dtype), iters=iters)
    got = forward_backward(hcext.sinkhorn, s)
    (out,), grad = got.outs, got.grads["logits"]
    # The forward is the fp32 computation on the upcast input, returned in fp32; the gradient
    # is the fp32 gradient rounded once to the input dtype.
    assert out.dtype == torch.float32 and grad.dtype == dtype
    compare_results(got, forward_backward(reference_sinkhorn, s.cast(torch.float32)), scale=None)
    # and within the input dtype's tolerance of the reference run on the low-precision input
    compare_results(got, forward_backward(reference_sinkhorn, s), scale=None)
    # the backward op itself: fp32 grad_output, logits-dtype result
    assert_close_dtype(BACKWARD_OP(got.weights[0], s.tensors()[0], iters, 1e-6), grad)


@pytest.mark.parametrize("n", [1, 3, 4, 16, 32])
@pytest.mark.parametrize("layout_case", ["lead=(7,)", "transposed", "lead=(0,)"])
def test_matches_reference_fp64(device, n, layout_case):
    lead, kind = LAYOUT_CASES[layout_case]
    out, grad = _check_parity(torch.randn(*lead, n, n, device=device, dtype=torch.float64), kind, iters=20)
    assert out.dtype == torch.float64 and grad.dtype == torch.float64


# ---------------------------------------------------------------------------------------
# The doubly-stochastic property


@pytest.mark.parametrize("iters", ITERS_VALUES)
@pytest.mark.parametrize("n", [2, 3, 4, 8, 32])
def test_rows_sum_to_one(device, n, iters):
    # The last half-step normalises rows, whatever iters is: rowsum = s / (s + eps), which
    # is 1 within 1e-5 unless a row's sum s before that step is tiny (peaked logits).
    out = hcext.sinkhorn(torch.randn(64, n, n, device=device) * 0.5, iters)
    assert (out > 0).all() and torch.isfinite(out).all()
    assert (out.sum(-1) - 1).abs().max().item() <= 1e-5


@pytest.mark.parametrize("n", [2, 3, 4, 8, 32])
def test_columns_sum_to_nearly_one_after_20_iters(device, n):
    out = hcext.sinkhorn(torch.randn(64, n, n, device=device) * 0.5, 20)
    assert (out.sum(-2) - 1).abs().max().item() <= 1e-3


def test_uniform_logits_give_uniform_matrix(device):
    # Equal logits: every entry is 1/n (up to eps), and adding a constant changes nothing.
    n = 4
    out = hcext.sinkhorn(torch.full((2, n, n), 3.0, device=device))
    assert_close_dtype(out, torch.full((2, n, n), 1.0 / n, device=device))
    x = torch.randn(5, n, n, device=device)
    assert_close_dtype(hcext.sinkhorn(x + 10.0), hcext.sinkhorn(x))


# ---------------------------------------------------------------------------------------
# gradcheck (fp64)


@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_gradcheck(device, lead, n, iters):
    x = torch.randn(*lead, n, n, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hcext.sinkhorn(t, iters), (x,))


def test_gradcheck_noncontiguous_and_eps(device):
    base = torch.randn(3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hcext.sinkhorn(t.transpose(-1, -2), 4, 1e-2), (base,))


# ---------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensor, aot dispatch with dynamic shapes)


def _sinkhorn_samples(device):
    """(name, args) samples for opcheck of hcext::sinkhorn."""
    yield "contiguous", (torch.randn(3, 4, 4, device=device), 5, 1e-6)
    yield "transposed", (torch.randn(2, 3, 5, 5, device=device).transpose(-1, -2), 3, 1e-6)
    yield "sliced", (torch.randn(4, 3, 6, device=device)[..., ::2], 2, 1e-4)
    yield "expanded", (torch.randn(1, 4, 4, device=device).expand(3, 4, 4), 2, 1e-6)
    yield "offset", (layout(torch.randn(3, 4, 4, device=device), "offset").tensor(), 4, 1e-6)
    yield "empty", (torch.randn(0, 4, 4, device=device), 20, 1e-6)
    yield "single", (torch.randn(4, 4, device=device), 1, 0.0)
    yield "n=1", (torch.randn(5, 1, 1, device=device), 3, 1e-6)
    yield "n=32", (torch.randn(2, 32, 32, device=device), 2, 1e-6)
    yield "fp64", (torch.randn(2, 3, 3, device=device, dtype=torch.float64), 3, 1e-6)
    yield "bf16", (torch.randn(4, 4, 4, device=device).to(torch.bfloat16), 20, 1e-6)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", [name for name, _ in _sinkhorn_samples("cpu")])
def test_opcheck_sinkhorn(device, name, requires_grad):
    run_opcheck(OP, dict(_sinkhorn_samples(device))[name], requires_grad=requires_grad)


@pytest.mark.parametrize(
    "case",
    ["contiguous", "grad-stride-0", "grad-transposed", "bf16-logits", "fp64", "empty"],
)
def test_opcheck_sinkhorn_backward(device, case):
    logits = torch.randn(3, 4, 4, device=device)
    grad = torch.randn(3, 4, 4, device=device)
    if case == "grad-stride-0":  # autograd may pass expanded gradients (e.g. from .sum())
        grad = torch.ones((), device=device).expand(3, 4, 4)
    elif case == "grad-transposed":
        grad = grad.transpose(-1, -2)
    elif case == "bf16-logits":
        logits = logits.to(torch.bfloat16)
    elif case == "fp64":
        logits, grad = logits.double(), grad.double()
    elif case == "empty":
        logits, grad = logits[:0], grad[:0]
    run_opcheck(BACKWARD_OP, (grad, logits, 5, 1e-6))


def test_backward_op_matches_autograd_and_accepts_expanded_grad(device):
    logits = torch.randn(6, 5, 5, device=device, requires_grad=True)
    reference_sinkhorn(logits, 7).sum().backward()
    grad = BACKWARD_OP(torch.ones((), device=device).expand(6, 5, 5), logits.detach(), 7, 1e-6)
    assert grad.is_contiguous()
    assert_close_dtype(grad, logits.grad)


# ---------------------------------------------------------------------------------------
# torch.compile


def _loss_fn(x, w):
    # The op between other ops, with keyword arguments, as a model would call it.
    return (hcext.sinkhorn(x * 0.5, iters=7, eps=1e-5) * w).sum()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("n", [4, 5])
def test_compile_matches_eager(device, fresh_dynamo, backend, n):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_loss_fn, backend=counter, fullgraph=True)
    w = torch.randn(6, n, n, device=device)
    x = torch.randn(6, n, n, device=device, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_(True)
    loss = compiled(x, w)
    loss.backward()
    loss_eager = _loss_fn(x_eager, w)
    loss_eager.backward()
    assert counter.frame_count == 1
    assert_close_dtype(loss, loss_eager)
    assert_close_dtype(x.grad, x_eager.grad)


def test_compile_inductor(device, fresh_dynamo):
    # Kept tiny (inductor compiles take minutes on small CI machines): the op alone, so
    # inductor emits it as an extern kernel and checks its output sizes and strides.
    compiled = torch.compile(lambda t: hcext.sinkhorn(t, 3), backend="inductor", fullgraph=True)
    x = torch.randn(5, 4, 4, device=device, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_(True)
    w = torch.randn(5, 4, 4, device=device)
    out = compiled(x)
    (out * w).sum().backward()
    out_eager = hcext.sinkhorn(x_eager, 3)
    (out_eager * w).sum().backward()
    assert_close_dtype(out, out_eager)
    assert_close_dtype(x.grad, x_eager.grad)


def test_compile_dynamic_shapes_do_not_recompile(device, fresh_dynamo):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_loss_fn, backend=counter, fullgraph=True, dynamic=True)

    def check(tokens):
        w = torch.randn(tokens, 4, 4, device=device)
        x = torch.randn(tokens, 4, 4, device=device, requires_grad=True)
        x_eager = x.detach().clone().requires_grad_(True)
        loss = compiled(x, w)
        loss.backward()
        _loss_fn(x_eager, w).backward()
        assert_close_dtype(loss, _loss_fn(x_eager.detach(), w))
        assert_close_dtype(x.grad, x_eager.grad)

    for tokens in (3, 8, 13):
        check(tokens)
    assert counter.frame_count == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        check(21)
    assert counter.frame_count == 1


def test_export_keeps_the_op(device):
    class M(torch.nn.Module):
        def forward(self, x):
            return hcext.sinkhorn(x, 4) * 2

    x = torch.randn(3, 4, 4, device=device)
    ep = torch.export.export(M(), (x,))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert OP in targets
    assert_close_dtype(ep.module()(x), hcext.sinkhorn(x, 4) * 2)


# ---------------------------------------------------------------------------------------
# Memory: the backward recomputes, so autograd keeps only the logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_saves_only_the_logits(device, dtype):
    logits = torch.randn(16, 4, 4, device=device).to(dtype).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = hcext.sinkhorn(logits, 20)
    assert len(saved) == 1, [tuple(t.shape) for t in saved]
    (s,) = saved
    assert s.shape == logits.shape and s.dtype == logits.dtype
    assert s.numel() * s.element_size() == logits.numel() * logits.element_size()
    assert s.data_ptr() == logits.data_ptr()  # the logits themselves, not a copy
    # and the saved logits suffice for a correct backward
    out.sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    reference_sinkhorn(ref, 20).sum().backward()
    assert_close_dtype(logits.grad, ref.grad)


def test_no_grad_input_records_no_graph(device):
    out = hcext.sinkhorn(torch.randn(3, 4, 4, device=device))
    assert out.grad_fn is None and not out.requires_grad


# ---------------------------------------------------------------------------------------
# Argument errors: a RuntimeError that names the offending argument


def _bad_sinkhorn_calls():
    """BadCases: make(device) gives the call (logits, iters, eps)."""

    def call(make_logits, iters=20, eps=1e-6):
        return lambda d: sample(make_logits(d), iters, eps)

    def randn(*shape, **kw):
        return lambda d: torch.randn(*shape, device=d, **kw)

    square = randn(2, 4, 4)
    return [
        BadCase("non-square", call(randn(3, 4, 5)), r"logits' last two dims .*square"),
        BadCase("1-dim", call(randn(4)), r"logits .*at least 2 dims, got 1"),
        BadCase("0-dim", call(randn(())), r"logits .*at least 2 dims, got 0"),
        BadCase("int", call(lambda d: torch.randint(0, 5, (2, 4, 4), device=d)),
                r"(?i)logits .*floating-point.*(int|long)"),
        BadCase("bool", call(lambda d: torch.ones(2, 4, 4, device=d, dtype=torch.bool)), r"logits .*floating-point"),
        BadCase("complex", call(randn(2, 4, 4, dtype=torch.complex64)), r"(?i)logits .*floating-point.*complex"),
        BadCase("iters=0", call(square, 0), r"iters in \[1, 1048576\], got 0"),
        BadCase("iters=-3", call(square, -3), r"iters in \[1, 1048576\], got -3"),
        BadCase("iters-huge", call(square, 2**20 + 1), r"iters in \[1, 1048576\], got 1048577"),
        BadCase("eps<0", call(square, 20, -1e-3), r"eps .*finite and >= 0, got -0.001"),
        BadCase("eps=inf", call(square, 20, math.inf), r"eps .*finite.*got inf"),
        BadCase("eps=nan", call(square, 20, math.nan), r"eps .*finite.*got nan"),
        BadCase("n=33", call(randn(2, 33, 33)), r"n \(logits' last dim\) in \[1, 32\], got 33"),
        BadCase("n=0", call(randn(2, 0, 0)), r"n \(logits' last dim\) in \[1, 32\], got 0"),
    ]


BAD_SINKHORN = {case.id: case for case in _bad_sinkhorn_calls()}


def _backward_with_ones(logits, iters, eps):
    return BACKWARD_OP(torch.ones(logits.shape, device=logits.device), logits, iters, eps)


@pytest.mark.parametrize("entry", ["op", "wrapper", "backward_op"])
@pytest.mark.parametrize("case", list(BAD_SINKHORN))
def test_bad_arguments_raise(device, case, entry):
    fn = {"op": OP, "wrapper": hcext.sinkhorn, "backward_op": _backward_with_ones}[entry]
    assert_rejects(fn, BAD_SINKHORN[case], device)


@pytest.mark.parametrize("case", list(BAD_SINKHORN))
def test_bad_arguments_raise_in_fake_kernel(case):
    # torch.compile / export see the fake kernel: it must reject the same inputs, alike.
    assert_rejects(OP, BAD_SINKHORN[case], "meta")


def test_error_names_the_op(device):
    bad = BadCase("non-square", lambda d: sample(torch.randn(3, 4, 5, device=d)), "")
    assert_rejects(OP, bad, device, prefix=r"hcext::sinkhorn: ")
    assert_rejects(lambda x: BACKWARD_OP(x, x, 2, 1e-6), bad, device, prefix=r"hcext::sinkhorn_backward: ")


def _bad_grad(grad):
    """A BadCase of sinkhorn_backward with a bad grad (make(device)) for logits [3, 4, 4]."""
    return lambda d: (BACKWARD_OP, sample(grad(d), torch.randn(3, 4, 4, device=d), 5, 1e-6))


@pytest.mark.parametrize("grad_shape", [(3, 4, 5), (4, 4), (2, 3, 4, 4), (3, 5, 5)])
@pytest.mark.parametrize("on_meta", [False, True])
def test_backward_rejects_grad_of_wrong_shape(device, grad_shape, on_meta):
    case = BadCase("grad-shape", _bad_grad(lambda d: torch.randn(grad_shape, device=d)),
                   r"expected grad of shape \(?\[?3, 4, 4")
    assert_rejects(None, case, "meta" if on_meta else device)


BAD_INTEGER_GRAD = BadCase("grad-int", _bad_grad(lambda d: torch.ones(3, 4, 4, device=d, dtype=torch.int32)),
                           r"grad .*floating-point")


def test_backward_rejects_integer_grad(device):
    assert_rejects(None, BAD_INTEGER_GRAD, device)


def test_backward_fake_kernel_rejects_integer_grad():
    # Traced code (fake kernel) must reject what eager rejects.
    assert_rejects(None, BAD_INTEGER_GRAD, "meta")


# ---------------------------------------------------------------------------------------
# Build info and the README example


def test_build_info():
    info = hcext.build_info()
    assert set(info) == {"backends", "torch_version", "cuda_version", "cuda_arch_list", "debug"}
    assert "cpu" in info["backends"]
    assert set(info["backends"]) <= {"cpu", "cuda"}
    assert hcext.has_cuda() == ("cuda" in info["backends"])
    assert (info["cuda_version"] is None) == (not hcext.has_cuda())
    assert isinstance(info["debug"], bool)
    # The native library runs only against the torch it was compiled with.
    assert torch.__version__.split("+")[0] == info["torch_version"]


def test_readme_example():
    rows = torch.ops.hcext.sinkhorn(torch.randn(4, 4, 4)).sum(-1)
    torch.testing.assert_close(rows, torch.ones(4, 4), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# CUDA vs CPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 8, 16, 32])  # 2, 4, 8: unrolled paths; others: generic
@pytest.mark.parametrize("tokens", [1, 300])
def test_cuda_matches_cpu(n, iters, dtype, tokens):
    s = sample((torch.randn(tokens, n, n) * 2).to(dtype), iters)
    cpu = forward_backward(OP, s)
    gpu = forward_backward(OP, s.to("cuda"))
    (out_gpu,), (grad_gpu,) = gpu.outs, gpu.grads.values()
    assert out_gpu.device == grad_gpu.device == torch.device("cuda", torch.cuda.current_device())
    assert out_gpu.dtype == cpu.outs[0].dtype and grad_gpu.dtype == dtype
    compare_results(gpu.to("cpu"), cpu, scale=None)


@requires_cuda
def test_cuda_noncontiguous_and_leading_shapes():
    base = torch.randn(5, 3, 2 * 16, 16)
    s = sample(Input(base, lambda t: t.transpose(0, 1)[..., ::2, :]), 5)
    compare_results(forward_backward(OP, s.to("cuda")).to("cpu"), forward_backward(OP, s), scale=None)


@requires_cuda
def test_cuda_output_on_input_device():
    # The op runs on the input's device, not the current one.
    last = torch.cuda.device_count() - 1
    x = torch.randn(3, 4, 4, device=f"cuda:{last}", requires_grad=True)
    with torch.cuda.device(0):
        out = OP(x, 5)
        out.sum().backward()
    assert out.device == x.device and x.grad.device == x.device
    assert_close_dtype(out.cpu(), OP(x.detach().cpu(), 5))


@requires_cuda
def test_cuda_backward_rejects_grad_on_other_device():
    case = BadCase("grad-on-cpu", lambda d: (BACKWARD_OP, sample(torch.randn(3, 4, 4), torch.randn(3, 4, 4, device=d),
                                                                5, 1e-6)), r"expected grad on cuda")
    assert_rejects(None, case, "cuda")
