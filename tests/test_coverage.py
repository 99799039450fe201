"""Where the code branches: every op family against hcext/reference.py at stream counts on
both sides of every compile-time size class of the n dispatch (hcext/dispatch.h: n = 4
unrolled; run-time n in 8-, 16- and 32-sized storage), with several hundred tokens (several
parallel chunks), forward and backward; and the results under 1, 2 and 4 threads: bitwise
equal (fixed-order reductions whose order does not depend on the threads' split; no BLAS call:
the mHC projection is hcext's own passes)."""

import pytest
import torch

import hcext
from hcext import reference as ref
from helpers import TOLERANCES, check_parity, sample

NS = [5, 9, 12, 16, 17, 32]
TOKENS = 300
# fp64 against the fp64 reference (tight), fp32 and bf16 streams against it by the suite's
# table and the twice-the-reference's-error rule (check_parity); coefficients stay fp32.
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _rand(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape) * scale).to(dtype)


def _coef_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_sinkhorn(n, dtype):
    check_parity(lambda t: hcext.ops.sinkhorn(t, 20, 1e-6), lambda t: ref.sinkhorn(t, 20, 1e-6),
                 sample(_rand(TOKENS, n, n, dtype=dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_streams(n, dtype):
    C, cd = 7, _coef_dtype(dtype)
    f, x = _rand(TOKENS, C, dtype=dtype), _rand(TOKENS, n, C, dtype=dtype)
    hp, hr = _rand(TOKENS, n, dtype=cd), _rand(TOKENS, n, n, dtype=cd)
    check_parity(hcext.ops.stream_aggregate, ref.stream_aggregate, sample(x, hp))
    check_parity(hcext.ops.stream_mix_expand, ref.stream_mix_expand, sample(f, x, hp, hr))


def _mhc_params(n, C, cd):
    D = n * n + 2 * n
    return [_rand(n * C, D, scale=0.1, dtype=cd), _rand(3, scale=0.5, dtype=cd), _rand(D, scale=0.5, dtype=cd)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_mhc_pre(n, dtype):
    C, cd = 3, _coef_dtype(dtype)
    check_parity(hcext.ops.mhc_pre, ref.mhc_pre, sample(_rand(TOKENS, n, C, dtype=dtype), *_mhc_params(n, C, cd)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_mhc_post_pre(n, dtype):
    C, cd = 3, _coef_dtype(dtype)
    f, x = _rand(TOKENS, C, dtype=dtype), _rand(TOKENS, n, C, dtype=dtype)
    hp, hr = _rand(TOKENS, n, scale=0.5, dtype=cd), _rand(TOKENS, n, n, scale=0.5, dtype=cd)
    check_parity(hcext.ops.mhc_post_pre, ref.mhc_post_pre, sample(f, x, hp, hr, *_mhc_params(n, C, cd)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_hc_dynamic(n, dtype):
    C, cd = 5, _coef_dtype(dtype)
    x = _rand(TOKENS, n, C, dtype=dtype)
    params = [_rand(n, n + 1, dtype=cd), _rand(n, dtype=cd), _rand(C, n + 1, scale=0.1, dtype=cd),
              _rand(C, scale=0.1, dtype=cd)]
    check_parity(hcext.ops.hc_coeffs, ref.hc_coeffs, sample(x, *params))


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

    results = _results_by_threads(run)
    # outputs: x_next, layer_input, h_post_next, h_res_next; gradients: f, x, h_post, h_res,
    # phi, alpha, bias. No BLAS call is involved (the projection is hcext's own passes).
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert torch.equal(a, b), f"result {i} differs between thread counts"


def _results_by_threads(run):
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            out.append(run())
        return out
    finally:
        torch.set_num_threads(before)


def _outputs_and_grads(op, *inputs):
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = op(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
    diff = [t for t in leaves if t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, diff))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_gemm_families_bitwise_across_thread_counts(dtype):
    # Sinkhorn, the stream ops (shared coefficients: fixed-order token sums) and dynamic HC
    # (the Ĝ reduction in fixed token chunks) involve no BLAS call: bitwise equal.
    g = torch.Generator().manual_seed(2)
    n, C, T = 4, 40, 1000
    x, f = torch.randn(T, n, C, generator=g).to(dtype), torch.randn(T, C, generator=g).to(dtype)
    hp, hr = torch.rand(n, generator=g), torch.rand(n, n, generator=g)
    hc_params = [torch.randn(n, n + 1, generator=g), torch.randn(n, generator=g),
                 torch.randn(C, n + 1, generator=g) * 0.1, torch.randn(C, generator=g) * 0.1]
    cases = [
        (lambda t: hcext.ops.sinkhorn(t, 20, 1e-6), (torch.randn(T, n, n, generator=g),)),
        (hcext.ops.stream_aggregate, (x, hp)),
        (hcext.ops.stream_mix_expand, (f, x, hp, hr)),
        (hcext.ops.hc_coeffs, (x, *hc_params)),
    ]
    for op, inputs in cases:
        results = _results_by_threads(lambda: _outputs_and_grads(op, *inputs))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)
