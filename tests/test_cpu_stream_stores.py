"""Streaming (non-temporal) stores of the CPU kernels (csrc/common/cpu_vec_io.h): an output of at
least 16 MB, 16-byte aligned rows, on an AVX2 / AVX-512 CPU is written around the caches.
HCEXT_CPU_STREAM_STORES=0 (read on every call) turns them off. They change where the bytes go,
never which bytes: every op that streams an output gives the same bits with and without them,
for every ISA variant, on whole and partial vectors (C not a multiple of the vector), and
for a thread count that splits the tokens unevenly (the fence ends each task's stores).

The shapes are the smallest that pass the 16 MB threshold (x of 16-32 MB), so the test runs each
op twice on ~20-40 MB of data."""

import pytest
import torch

import hcext  # noqa: F401
from hcext import ops

THRESHOLD = 16 << 20


def _streams(dtype, C):
    # x [T, 4, C] of at least 16 MB (grad_x and the mixed streams are x-sized).
    size = torch.empty((), dtype=dtype).element_size()
    T = -(-THRESHOLD // (4 * C * size)) + 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 4, C, generator=g).to(dtype)
    f = torch.randn(T, C, generator=g).to(dtype)
    return x, f


def _run_all(x, f):
    """Every op with a streamed output: outputs and gradients (x-sized and row-sized)."""
    T, n, C = x.shape
    D = n * n + 2 * n
    g = torch.Generator().manual_seed(1)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32  # the compute dtype
    h_post = (torch.rand(T, n, generator=g) * 2).to(cd)
    h_res = torch.rand(T, n, n, generator=g).to(cd)
    h_pre = torch.rand(T, n, generator=g).to(cd)
    phi = (torch.randn(n * C, D, generator=g) / (n * C) ** 0.5).to(cd)
    alpha, bias = torch.full((3,), 0.01, dtype=cd), (torch.randn(D, generator=g) * 0.1).to(cd)
    gx = torch.randn(x.shape, generator=g).to(x.dtype)
    gy = torch.randn(f.shape, generator=g).to(x.dtype)
    out = {}
    out["mix"] = ops.stream_mix_expand(f, x, h_post, h_res)
    out["mix_backward"] = torch.ops.hcext.stream_mix_expand_backward(gx, f, x, h_post, h_res)
    out["aggregate"] = ops.stream_aggregate(x, h_pre)
    xr = x.detach().requires_grad_()
    y = ops.stream_aggregate(xr, h_pre)
    out["aggregate_backward"] = torch.autograd.grad(y, xr, gy)
    xr = x.detach().requires_grad_()
    y, hp, hr = ops.mhc_pre(xr, phi, alpha, bias)
    out["mhc_pre"] = (y, hp, hr)
    out["mhc_pre_backward"] = torch.autograd.grad([y, hp, hr], [xr], [gy, torch.ones_like(hp), torch.ones_like(hr)])
    return out


@pytest.mark.parametrize("isa", [None, "avx2", "baseline"], ids=["best", "avx2", "baseline"])
@pytest.mark.parametrize("dtype,C", [(torch.float32, 1024), (torch.bfloat16, 1024), (torch.float32, 1000),
                                     (torch.float64, 512)], ids=str)
def test_streamed_outputs_are_bitwise_the_cached_ones(monkeypatch, isa, dtype, C):
    if isa:
        monkeypatch.setenv("HCEXT_CPU_ISA", isa)
    else:
        monkeypatch.delenv("HCEXT_CPU_ISA", raising=False)
    x, f = _streams(dtype, C)
    assert x.nbytes >= THRESHOLD
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # uneven token split
    try:
        monkeypatch.setenv("HCEXT_CPU_STREAM_STORES", "0")
        cached = _run_all(x, f)
        monkeypatch.delenv("HCEXT_CPU_STREAM_STORES")
        streamed = _run_all(x, f)
    finally:
        torch.set_num_threads(threads)
    for name in cached:
        for a, b in zip(cached[name], streamed[name]):
            assert torch.equal(a, b), name


def test_small_outputs_give_the_same_bits_either_way(monkeypatch):
    # Below the threshold nothing streams: the switch must not change anything.
    x, f = torch.randn(64, 4, 64), torch.randn(64, 64)
    monkeypatch.setenv("HCEXT_CPU_STREAM_STORES", "0")
    a = _run_all(x, f)
    monkeypatch.delenv("HCEXT_CPU_STREAM_STORES")
    b = _run_all(x, f)
    for name in a:
        for u, v in zip(a[name], b[name]):
            assert torch.equal(u, v), name
