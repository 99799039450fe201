"""Where the code branches: every op family against hcext/reference.py at stream counts on
both sides of every compile-time size class of the n dispatch (hcext/dispatch.h: n = 4
unrolled; run-time n in 8-, 16- and 32-sized storage), with several hundred tokens (several
parallel chunks), forward and backward; and the results under 1, 2 and 4 threads: bitwise
equal where only hcext's kernels are involved (fixed-order reductions), within the fp32
tolerance where a value passes through the projection GEMM (at::mm: the BLAS library's
blocking depends on the thread count; measured: equal for 1 vs 2 threads, up to 3e-7 in
h_res for 4 threads on the 2-core CI machine)."""

from helpers import TOLERANCES

import pytest
import torch

import hcext
from hcext import reference as ref

NS = [5, 9, 12, 16, 17, 32]
TOKENS = 300
F64 = torch.float64


def _leaf(*shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(True)


def _mhc_inputs(n, C, dtype=F64):
    D = n * n + 2 * n
    return [_leaf(TOKENS, n, C, dtype=dtype), _leaf(n * C, D, scale=0.1), _leaf(3, scale=0.5), _leaf(D, scale=0.5)]


def _parity(op, reference, inputs, rtol=1e-8, atol=1e-9):
    out, want = op(*inputs), reference(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    weights = [torch.randn_like(o) for o in out]
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), diff)
    exp = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, weights)), diff)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n", NS)
def test_sinkhorn(n):
    _parity(lambda t: hcext.ops.sinkhorn(t, 20, 1e-6), lambda t: ref.sinkhorn(t, 20, 1e-6), [_leaf(TOKENS, n, n)])


@pytest.mark.parametrize("n", NS)
def test_streams(n):
    C = 7
    f, x, hp, hr = _leaf(TOKENS, C), _leaf(TOKENS, n, C), _leaf(TOKENS, n), _leaf(TOKENS, n, n)
    _parity(hcext.ops.stream_aggregate, ref.stream_aggregate, [x, hp])
    _parity(hcext.ops.stream_mix_expand, ref.stream_mix_expand, [f, x, hp, hr])


@pytest.mark.parametrize("n", NS)
def test_mhc_pre(n):
    _parity(hcext.ops.mhc_pre, ref.mhc_pre, _mhc_inputs(n, 3))


@pytest.mark.parametrize("n", NS)
def test_mhc_post_pre(n):
    C = 3
    f, hp, hr = _leaf(TOKENS, C), _leaf(TOKENS, n, scale=0.5), _leaf(TOKENS, n, n, scale=0.5)
    x, phi, alpha, bias = _mhc_inputs(n, C)
    _parity(hcext.ops.mhc_post_pre, ref.mhc_post_pre, [f, x, hp, hr, phi, alpha, bias])


@pytest.mark.parametrize("n", NS)
def test_hc_dynamic(n):
    C = 5
    inputs = [_leaf(TOKENS, n, C), _leaf(n, n + 1), _leaf(n), _leaf(C, n + 1, scale=0.1), _leaf(C, scale=0.1)]
    _parity(hcext.ops.hc_coeffs, ref.hc_coeffs, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_across_thread_counts(dtype):
    n, C = 4, 96
    g = torch.Generator().manual_seed(1)
    D = n * n + 2 * n
    x = torch.randn(1000, n, C, generator=g).to(dtype)
    phi, alpha, bias = torch.randn(n * C, D, generator=g) * 0.05, torch.rand(3, generator=g), torch.randn(D, generator=g)
    f = torch.randn(1000, C, generator=g).to(dtype)
    hp, hr = torch.rand(n, generator=g), torch.rand(n, n, generator=g)  # shared: the fixed-order token sums

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (f, x, hp, hr, phi, alpha, bias)]
        outs = hcext.ops.mhc_post_pre(*leaves)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))

    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    # outputs: x_next, layer_input, h_post_next, h_res_next; gradients: f, x, h_post, h_res,
    # phi, alpha, bias. x_next and the mix's gradients of f, h_post, h_res never meet the GEMM.
    own_kernels_only = {0, 4, 6, 7}
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other)):
            if i in own_kernels_only:
                assert torch.equal(a, b), f"result {i} differs between thread counts"
            else:
                torch.testing.assert_close(a, b, **TOLERANCES[a.dtype])
