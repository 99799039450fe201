"""The CPU kernels are compiled for baseline x86-64, AVX2 and AVX-512 and pick one at run time
(csrc/cpu/isa.h); HCEXT_CPU_ISA=baseline|avx2 asks for a lower one. Every variant must give
the same results: bit-identical for Sinkhorn (compiled without FMA contraction), within fp32
rounding for the stream and mHC row passes (FMA contraction where the ISA has it). On a CPU
without AVX2/AVX-512 the request is clamped and the variants coincide.
"""

import pytest
import torch

import hcext
from hcext import ops
from helpers import assert_close_dtype, assert_scaled_close

ISAS = ["baseline", "avx2", "avx512"]


def _run_all(seed, dtype, C):
    g = torch.Generator().manual_seed(seed)
    n, T = 4, 7
    coef = torch.float32
    x = torch.randn(T, n, C, generator=g).to(dtype).requires_grad_(True)
    f = torch.randn(T, C, generator=g).to(dtype).requires_grad_(True)
    logits = torch.randn(T, n, n, generator=g, dtype=coef).requires_grad_(True)
    phi = (torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5).requires_grad_(True)
    alpha = torch.full((3,), 0.5, requires_grad=True)
    bias = (torch.randn(n * n + 2 * n, generator=g) * 0.5).requires_grad_(True)
    h_res = ops.sinkhorn(logits, 20)
    y, h_post_next, h_res_next = ops.mhc_pre(x, phi, alpha, bias)
    h_post = torch.sigmoid(logits[..., 0]) * 2
    out = ops.stream_mix_expand(f, x, h_post, h_res)
    fused = ops.mhc_post_pre(f, x, h_post, h_res, phi, alpha, bias)
    outs = [h_res, y, h_post_next, h_res_next, out, *fused]
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x, f, logits, phi, alpha, bias])
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("C", [64, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_isa_variants_agree(monkeypatch, dtype, C):
    results = {}
    for isa in ISAS:
        monkeypatch.setenv("HCEXT_CPU_ISA", isa)
        results[isa] = _run_all(0, dtype, C)
    base_outs, base_grads = results["baseline"]
    for isa in ISAS[1:]:
        outs, grads = results[isa]
        # Sinkhorn: bit-identical on every ISA.
        assert torch.equal(outs[0], base_outs[0]), isa
        # The others: the tolerance table's row of each tensor's dtype (gradients: the atol
        # scaled by the gradient's largest value).
        for o, ref in zip(outs, base_outs):
            assert_close_dtype(o, ref, msg=lambda m: f"{isa}: {m}")
        for g, ref in zip(grads, base_grads):
            assert_scaled_close(g, ref, name=isa)


def test_unknown_isa_request_is_ignored(monkeypatch):
    monkeypatch.setenv("HCEXT_CPU_ISA", "avx512")
    expected = _run_all(1, torch.float32, 16)
    monkeypatch.setenv("HCEXT_CPU_ISA", "not-an-isa")
    got = _run_all(1, torch.float32, 16)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        assert torch.equal(a, b)
