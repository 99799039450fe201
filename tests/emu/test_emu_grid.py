"""The emulated grid itself: every CUDA kernel of csrc/ runs in it, and the kernels' results do
not depend on the schedule (block order, thread interleaving), as their fixed-order reductions
promise."""

from __future__ import annotations

import math

import pytest
import torch

import hcext
from emulated import emulated, executed_kernels, load, source_kernels
from helpers import forward_backward, sample


def _workload():
    """One forward + backward of every op family, shaped to reach every kernel: per-token and
    shared coefficients (the fixed-order sum over tokens), n = 4 (fast paths) and n = 5
    (generic), n = 8 (mHC's GEMM formulation on CUDA), fp32 and bf16 streams, original HC with
    enough tokens for several Ĝ chunks."""
    torch.manual_seed(0)
    results = []
    for n, C, dtype in [(4, 64, torch.float32), (5, 12, torch.bfloat16)]:
        T = 7
        x = torch.randn(T, n, C, dtype=dtype)
        f = torch.randn(T, C, dtype=dtype)
        h_pre = torch.rand(T, n)
        h_post_shared = torch.rand(n) * 2
        h_res_shared = torch.rand(n, n)
        D = n * n + 2 * n
        phi = torch.randn(n * C, D) / math.sqrt(n * C)
        alpha = torch.rand(3)
        bias = torch.randn(D) * 0.5
        pre_mix = torch.rand(T, n)
        calls = [
            (hcext.stream_aggregate, sample(x, h_pre)),
            (hcext.stream_mix_expand, sample(f, x, h_post_shared, h_res_shared)),
            (lambda t: hcext.sinkhorn(t, 5), sample(torch.randn(T, n, n))),
            (hcext.mhc_pre, sample(x, phi, alpha, bias)),
            (hcext.mhc_post_pre, sample(f, x, h_post_shared, h_res_shared, phi, alpha, bias)),
            (hcext.mhc_pre_shifted, sample(x, pre_mix, phi, alpha, bias)),
        ]
        for fn, s in calls:
            results.append(forward_backward(fn, s))
    # n = 8 (D = 80): the CUDA backend's GEMM formulation of the projection (mhc_rows, mhc_grad_x).
    n, C = 8, 16
    D = n * n + 2 * n
    results.append(forward_backward(hcext.mhc_pre, sample(torch.randn(5, n, C, dtype=torch.bfloat16),
                                                          torch.randn(n * C, D) / math.sqrt(n * C), torch.rand(3),
                                                          torch.randn(D) * 0.5)))
    T, n, C = 300, 4, 24  # HC: 300 tokens -> several 64-token chunks of the Ĝ reduction
    x = torch.randn(T, n, C)
    hc = lambda *a: hcext.hc_coeffs(*a, norm="layer")  # noqa: E731
    results.append(forward_backward(hc, sample(x, torch.randn(n, n + 1) * 0.5, torch.randn(n) * 0.5,
                                               torch.randn(C, n + 1) / math.sqrt(C), torch.randn(C) / math.sqrt(C))))
    return results


def _flatten(results):
    out = []
    for r in results:
        out += list(r.outs) + [r.grads[k] for k in sorted(r.grads)]
    return out


def test_every_kernel_runs():
    """Every __global__ kernel of csrc/<family>/<family>_kernels.cu is launched by the workload
    (so it runs under AddressSanitizer in CI; tests/emu/test_emu_parity.py checks its values)."""
    before = executed_kernels()
    with emulated():
        _workload()
    after = executed_kernels()
    launched = {k for k in after if after[k] > before.get(k, 0)}
    kernels = source_kernels()
    assert len(kernels) >= 17, kernels
    missing = sorted(set(kernels) - launched)
    assert not missing, f"kernels never launched: {missing}"
    assert load().address_sanitizer, "the emulated backend must be built with AddressSanitizer"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_schedules_are_bitwise_identical(seed):
    """Shuffled block order and thread interleaving (seed) give the in-order schedule's bits."""
    with emulated(seed=0):
        want = _flatten(_workload())
    with emulated(seed=seed):
        got = _flatten(_workload())
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"tensor {i} differs under schedule {seed}"


def test_emulated_results_are_not_the_cpu_kernels():
    """The routing works: inside emulated() the ops run hcext_emu's kernels (counted), outside
    they do not."""
    x = torch.randn(3, 4, 8)
    h = torch.rand(3, 4)
    before = executed_kernels().get("aggregate_forward_kernel", 0)
    hcext.stream_aggregate(x, h)
    assert executed_kernels().get("aggregate_forward_kernel", 0) == before
    with emulated():
        hcext.stream_aggregate(x, h)
    assert executed_kernels().get("aggregate_forward_kernel", 0) == before + 1


@pytest.mark.parametrize("shifted", [False, True], ids=["standard", "shifted"])
@pytest.mark.parametrize("n", [4, 6, 8])
def test_fused_boundary_backward_passes(n, shifted):
    """mhc_post_pre(_shifted)'s backward on the CUDA path: for n <= 6 the mix's backward runs
    inside the grad_x pass on x_next's gradient (never stored: no launch of the streams'
    mix_backward_kernel), and the shifted collapse's row sums Σ_c gy x_i come out of the same
    pass (no mhc_layer_input_grad_kernel); n > 6 (the GEMM formulation) keeps both as passes of
    their own. The values are checked against the reference in test_emu_parity.py."""
    T, C = 7, 72  # two channel blocks of the grad_x pass, the second partial
    g = torch.Generator().manual_seed(3)
    D = n * n + 2 * n
    f, x = torch.randn(T, C, generator=g), torch.randn(T, n, C, generator=g)
    h_post, h_res = torch.rand(T, n, generator=g), torch.rand(T, n, n, generator=g)
    phi = (0.05 * torch.randn(n * C, D, generator=g)).requires_grad_()
    alpha, bias = torch.tensor([0.8, 0.9, 1.1], requires_grad=True), (0.1 * torch.randn(D, generator=g)).requires_grad_()
    leaves = [t.requires_grad_() for t in (f, x, h_post, h_res)]
    pre_mix = torch.rand(T, n, generator=g).requires_grad_()
    with emulated():
        if shifted:
            outs = hcext.mhc_post_pre_shifted(f, x, h_post, h_res, pre_mix, phi, alpha, bias)
        else:
            outs = hcext.mhc_post_pre(f, x, h_post, h_res, phi, alpha, bias)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
        before = executed_kernels()
        grads = torch.autograd.grad(loss, leaves + [phi, alpha, bias] + ([pre_mix] if shifted else []))
        after = executed_kernels()
    ran = {k for k in after if after[k] > before.get(k, 0)}
    assert all(torch.isfinite(t).all() for t in grads)
    assert ("mhc_grad_x_phi_kernel" if n <= 6 else "mhc_grad_x_kernel") in ran, ran
    assert ("mix_backward_kernel" in ran) == (n > 6), ran
    if shifted:
        assert ("mhc_layer_input_grad_kernel" in ran) == (n > 6), ran
        assert ("mhc_grad_rows_reduce_kernel" in ran) == (n <= 6), ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n,C", [(4, 40), (4, 190), (6, 9), (1, 700)])
def test_resident_projection(n, C, dtype):
    """Where a tile of 32 tokens' rows fits in 80 KB of shared memory (cuda::mhc_project_resident),
    mhc_pre and mhc_post_pre run the standard collapse's projection with the rows resident
    (mhc_project_resident_kernel: x, or the mixed x_next, read from memory once; no aggregate
    pass), over the same splits in the same order as the split kernel, which mhc_coeffs runs:
    proj, rstd and the coefficients bitwise mhc_coeffs', the layer input bitwise stream_aggregate's
    with them, x_next bitwise stream_mix_expand's. Larger rows keep the split kernel and the
    aggregate pass."""
    T = 45  # two token tiles, the second partial
    resident = 32 * n * C * torch.empty((), dtype=dtype).element_size() <= 80 * 1024
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(4)
    D = n * n + 2 * n
    x = torch.randn(T, n, C, generator=g).to(dtype)
    f = torch.randn(T, C, generator=g).to(dtype)
    h_post, h_res = (2 * torch.rand(T, n, generator=g)).to(cd), torch.rand(T, n, n, generator=g).to(cd)
    phi = (torch.randn(n * C, D, generator=g) / math.sqrt(n * C)).to(cd)
    alpha, bias = torch.tensor([0.7, 0.8, 0.9], dtype=cd), (0.5 * torch.randn(D, generator=g)).to(cd)
    scalars = (20, 1e-6, 1e-6, 1e-6, 2.0)
    ops = torch.ops.hcext
    with emulated():
        before = executed_kernels()
        layer_input, h_post_o, h_res_o, proj, rstd = ops.mhc_pre_fwd(x, phi, alpha, bias, *scalars)
        after = executed_kernels()
        h_pre_c, h_post_c, h_res_c, proj_c, rstd_c = ops.mhc_coeffs_fwd(x, phi, alpha, bias, *scalars)
        aggregate = ops.stream_aggregate(x, h_pre_c)
        x_next, layer_next, _, _, proj_next, _ = ops.mhc_post_pre_fwd(f, x, h_post, h_res, phi, alpha, bias, *scalars)
        mixed = ops.stream_mix_expand(f, x, h_post, h_res)
        proj_mixed = ops.mhc_coeffs_fwd(mixed, phi, alpha, bias, *scalars)
        aggregate_next = ops.stream_aggregate(mixed, proj_mixed[0])
    ran = {k for k in after if after[k] > before.get(k, 0)}
    assert ("mhc_project_resident_kernel" in ran) == resident, ran
    assert ("aggregate_forward_kernel" in ran) == (not resident), ran
    for a, b in ((proj, proj_c), (rstd, rstd_c), (h_post_o, h_post_c), (h_res_o, h_res_c), (layer_input, aggregate),
                 (x_next, mixed), (proj_next, proj_mixed[3])):
        assert torch.equal(a, b)
    assert torch.equal(layer_next, aggregate_next)
