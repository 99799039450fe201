"""A whole mHC sub-layer on hcext's ops: mhc_pre (coefficients + layer input) -> branch ->
stream_mix_expand. Parity of the fused mhc_pre with the reference, what autograd saves for
the sub-layer, and torch.compile of the sub-layer (eager, aot_eager, inductor; dynamic
token counts without recompiles)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hcext
from hcext import reference as ref
from helpers import assert_close_dtype, check_parity, run_opcheck, sample


def make_params(n, C, dtype=torch.float32, device="cpu", scale=1.0):
    D = n * n + 2 * n
    phi = torch.randn(n * C, D, dtype=dtype, device=device) * scale / (n * C) ** 0.5
    alpha = torch.tensor([0.8, 0.5, 1.2], dtype=dtype, device=device)
    bias = torch.randn(D, dtype=dtype, device=device) * 0.5
    return phi, alpha, bias


def leaf(t):
    return t.detach().clone().requires_grad_(True)


MHC_PRE_OUTS = ("layer_input", "h_post", "h_res")


def mhc_pre_sample(x, params):
    return sample(x, *params, names=["x", "phi", "alpha", "bias"])


@pytest.mark.parametrize("n, C", [(1, 7), (2, 64), (3, 7), (4, 64), (4, 1280), (8, 7)])
@pytest.mark.parametrize("lead", [(0,), (5,), (2, 3)])
def test_mhc_pre_matches_reference_fp32(device, n, C, lead):
    # The shared runner against the reference in fp64: the outputs with the fp32 row of
    # helpers.TOLERANCES; the gradients with its atol scaled by the gradient's largest value
    # (grad_x sums terms that cancel: the norm's share against the projection's).
    x = torch.randn(*lead, n, C, device=device)
    check_parity(hcext.ops.mhc_pre, ref.mhc_pre, mhc_pre_sample(x, make_params(n, C, device=device)),
                 out_names=MHC_PRE_OUTS, scales={name: None for name in MHC_PRE_OUTS})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mhc_pre_low_precision_error_within_twice_reference_error(device, dtype):
    n, C = 4, 64
    x = torch.randn(6, n, C, device=device).to(dtype)
    got, _ = check_parity(hcext.ops.mhc_pre, ref.mhc_pre, mhc_pre_sample(x, make_params(n, C, device=device)),
                          out_names=MHC_PRE_OUTS)
    assert got.outs[0].dtype == dtype and got.grads["x"].dtype == dtype
    assert all(o.dtype == torch.float32 for o in got.outs[1:])


def test_mhc_pre_gradcheck():
    n, C = 3, 4
    x = torch.randn(2, n, C, dtype=torch.float64, requires_grad=True)
    params = [leaf(p) for p in make_params(n, C, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: hcext.ops.mhc_pre(*a, 5), (x, *params))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mhc_pre_opcheck(device, requires_grad, dtype):
    n, C = 4, 8
    x = torch.randn(3, n, C, device=device).to(dtype)
    args = (x, *make_params(n, C, device=device), 20, 1e-6, 1e-6, 1e-6, 2.0)
    run_opcheck(torch.ops.hcext.mhc_pre_fwd.default, args, requires_grad=requires_grad)
    run_opcheck(torch.ops.hcext.mhc_pre.default, args, requires_grad=requires_grad)


def test_mhc_pre_saves_only_inputs_proj_and_rstd():
    T, n, C = 16, 4, 32
    x = torch.randn(T, n, C, dtype=torch.bfloat16, requires_grad=True)
    params = [p.requires_grad_(True) for p in make_params(n, C)]
    inputs = {t.data_ptr() for t in (x, *params)}
    extra_bytes = []

    def pack(t):
        if t.data_ptr() not in inputs:
            extra_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, h_post, h_res = hcext.ops.mhc_pre(x, *params)
    assert sum(extra_bytes) == T * (n * n + 2 * n) * 4 + T * 4  # proj and rstd, fp32


def sublayer(x, phi, alpha, bias, weight):
    """One mHC sub-layer with a Linear branch: the pattern hcext.nn modules use."""
    layer_input, h_post, h_res = hcext.ops.mhc_pre(x, phi, alpha, bias)
    f = torch.nn.functional.linear(layer_input, weight)
    return hcext.ops.stream_mix_expand(f, x, h_post, h_res)


def reference_sublayer(x, phi, alpha, bias, weight):
    layer_input, h_post, h_res = ref.mhc_pre(x, phi, alpha, bias)
    return ref.stream_mix_expand(torch.nn.functional.linear(layer_input, weight), x, h_post, h_res)


def sublayer_inputs(tokens, n=4, C=16, device="cpu"):
    x = torch.randn(tokens, n, C, device=device)
    return [leaf(x), *[leaf(p) for p in make_params(n, C, device=device)], leaf(torch.randn(C, C, device=device) / C**0.5)]


def run_sublayer(fn, inputs):
    out = fn(*inputs)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return out.detach(), grads


def test_sublayer_matches_reference(device):
    # The shared runner, the reference sub-layer in fp64; gradients with the fp32 row's atol
    # scaled by their largest value.
    s = sample(*sublayer_inputs(9, device=device), names=["x", "phi", "alpha", "bias", "weight"])
    check_parity(sublayer, reference_sublayer, s, out_names=["out"], scales={"out": None})


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_sublayer_compiles_fullgraph_and_matches_eager(device, fresh_dynamo, backend):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(sublayer, backend=counter, fullgraph=True)
    inputs = sublayer_inputs(7, device=device)
    out, grads = run_sublayer(compiled, inputs)
    want, want_grads = run_sublayer(sublayer, inputs)
    assert_close_dtype(out, want)
    for g, w in zip(grads, want_grads):
        assert_close_dtype(g, w)
    assert counter.frame_count == 1


def test_sublayer_dynamic_tokens_do_not_recompile(device, fresh_dynamo):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(sublayer, backend=counter, fullgraph=True, dynamic=True)
    # Token counts avoid 3: alpha has shape [3], and duck sizing would tie them together.
    compiles_after_first = None
    for tokens in (5, 7, 11):
        inputs = sublayer_inputs(tokens, device=device)
        out, grads = run_sublayer(compiled, inputs)
        # (one compile may call the backend twice: dynamo restarts once to specialise the
        # float arguments, so count compiles after the first call, not from zero)
        compiles_after_first = compiles_after_first or counter.frame_count
    with torch.compiler.set_stance("fail_on_recompile"):
        inputs = sublayer_inputs(17, device=device)
        out, grads = run_sublayer(compiled, inputs)
    want, want_grads = run_sublayer(sublayer, inputs)
    assert_close_dtype(out, want)
    for g, w in zip(grads, want_grads):
        assert_close_dtype(g, w)
    assert counter.frame_count == compiles_after_first
