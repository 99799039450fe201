"""The mHC projection passes (no GEMM, x read in its own dtype): proj and rstd from
mhc_coeffs_fwd, grad_x and grad_phi from mhc_backward, against the same quantities computed in
fp64 by PyTorch, at the shapes where their blocking has tails: C not a multiple of the vector
width (8 / 16 lanes), token counts not a multiple of the register block (4 tokens), the L2
chunk (16) or the CUDA tile (32), every size class of n (1, 2, 3, 4, 8, 16, 32), fp32, bf16 and
fp64. Runs on every device of the suite (CPU, CUDA, and the emulated grid under make test-emu)."""

import math

import pytest
import torch

from helpers import TOLERANCES, assert_scaled_close

SCALARS = (5, 1e-6, 1e-6, 1e-6, 2.0)  # iters, norm_eps, sinkhorn_eps, pre_eps, post_mult


def _case(n, C, T, dtype, device):
    g = torch.Generator().manual_seed(n * 1000 + C * 10 + T)
    D = n * n + 2 * n
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(T, n, C, generator=g).to(dtype).to(device)
    phi = (torch.randn(n * C, D, generator=g) / math.sqrt(n * C)).to(cd).to(device)
    alpha = torch.rand(3, generator=g).to(cd).to(device)
    bias = (torch.randn(D, generator=g) * 0.5).to(cd).to(device)
    return x, phi, alpha, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("n,C", [(1, 9), (2, 7), (3, 13), (4, 17), (8, 5), (16, 3), (32, 1)])
def test_projection_forward(device, n, C, T, dtype):
    x, phi, alpha, bias = _case(n, C, T, dtype, device)
    _, _, _, proj, rstd = torch.ops.hcext.mhc_coeffs_fwd(x, phi, alpha, bias, *SCALARS)
    x64 = x.double().reshape(T, n * C)
    want_proj = x64 @ phi.double()
    want_rstd = torch.rsqrt(x64.pow(2).mean(-1) + SCALARS[1])
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    assert_scaled_close(proj.double(), want_proj, tol, name="proj")
    assert_scaled_close(rstd.double(), want_rstd, tol, name="rstd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("n,C", [(1, 9), (2, 7), (3, 13), (4, 17), (8, 5), (16, 3), (32, 1)])
def test_projection_backward(device, n, C, T, dtype):
    """grad_x and grad_phi of mhc_backward with only grad_h_post given (so the layer input plays
    no part): the projection's and the RMS statistic's shares, against autograd in fp64 through
    the same proj / rstd formulas."""
    x, phi, alpha, bias = _case(n, C, T, dtype, device)
    _, h_post, _, proj, rstd = torch.ops.hcext.mhc_coeffs_fwd(x, phi, alpha, bias, *SCALARS)
    g = torch.Generator().manual_seed(7)
    gq = torch.randn(h_post.shape, generator=g).to(h_post.dtype).to(device)
    grad_x, grad_phi, _, _ = torch.ops.hcext.mhc_backward(x, phi, alpha, bias, proj, rstd, None, None, gq, None,
                                                         SCALARS[0], SCALARS[2], SCALARS[3], SCALARS[4])
    # The reference: h_post = post_mult * sigmoid(alpha_post * proj_post * rstd + bias_post).
    x64 = x.double().reshape(T, n * C).requires_grad_()
    phi64 = phi.double().requires_grad_()
    r = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + SCALARS[1])
    p = (x64 @ phi64)[:, n:2 * n]
    hq = SCALARS[4] * torch.sigmoid(alpha.double()[1] * p * r + bias.double()[n:2 * n])
    want_x, want_phi = torch.autograd.grad(hq, [x64, phi64], gq.double())
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype == torch.bfloat16:  # grad_x is rounded to bf16 once
        tol = torch.bfloat16
    assert_scaled_close(grad_x.double().reshape(T, n * C), want_x, tol, name="grad_x")
    assert_scaled_close(grad_phi.double(), want_phi, torch.float64 if dtype == torch.float64 else torch.float32,
                        name="grad_phi")


def _token_slices(T, step):
    return [(a, min(T, a + step)) for a in range(0, T, step)]


# 611 tokens: the CPU's backward pass runs blocks of 24 tokens (row sums, epilogue, grad_x) in
# chunks of 264 (grad_phi's partial sums), and 611 is neither a multiple of those nor of the
# epilogue's 8 lanes; the slices of 37 tokens cut across all of them.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n,C", [(1, 9), (4, 17), (16, 3)])
def test_backward_per_token_results_do_not_depend_on_the_blocks(request, device, n, C, dtype):
    """mhc_backward with every incoming gradient (so the layer input's row sums run): grad_x of
    each token is computed from that token alone, so the whole call and calls on slices of it
    give the same bits — any block's offset or tail gone wrong would not. (Within rounding only
    where CUDA keeps the GEMM formulation, n > 6: cuBLAS's blocking depends on the token count.)
    The sums over tokens (grad_phi, grad_alpha, grad_bias) are sliced differently: equal to the
    slices' total within rounding."""
    T = 611
    x, phi, alpha, bias = _case(n, C, T, dtype, device)
    _, h_post, h_res, proj, rstd = torch.ops.hcext.mhc_coeffs_fwd(x, phi, alpha, bias, *SCALARS)
    g = torch.Generator().manual_seed(11)
    gy = torch.randn(T, C, generator=g).to(dtype).to(device)
    gp, gq = (torch.randn(h_post.shape, generator=g).to(h_post.dtype).to(device) for _ in range(2))
    gr = torch.randn(h_res.shape, generator=g).to(h_res.dtype).to(device)

    def backward(a, b):
        return torch.ops.hcext.mhc_backward(x[a:b], phi, alpha, bias, proj[a:b], rstd[a:b], gy[a:b], gp[a:b], gq[a:b],
                                            gr[a:b], SCALARS[0], SCALARS[2], SCALARS[3], SCALARS[4])

    whole = backward(0, T)
    pieces = [backward(a, b) for a, b in _token_slices(T, 37)]
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    if request.node.callspec.params["device"] == "cpu" or n <= 6:
        assert torch.equal(whole[0], torch.cat([p[0] for p in pieces]))
    else:
        assert_scaled_close(whole[0], torch.cat([p[0] for p in pieces]), dtype, name="grad_x")
    for i, name in ((1, "grad_phi"), (2, "grad_alpha"), (3, "grad_bias")):
        assert_scaled_close(whole[i], sum(p[i] for p in pieces), tol, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,C", [(1, 9), (4, 17), (16, 3)])
def test_boundary_backward_per_token_results_do_not_depend_on_the_blocks(request, device, n, C, dtype):
    """mhc_post_pre_backward (the CPU runs the mix's backward on each block of x_next's gradient
    inside the coefficient path's pass): grad_f, grad_x and the per-token gradients of h_post and
    h_res are each token's own, so the whole call and calls on slices give the same bits (within
    rounding where CUDA keeps the GEMM formulation, n > 6)."""
    T = 611
    x, phi, alpha, bias = _case(n, C, T, dtype, device)
    g = torch.Generator().manual_seed(12)
    cd = phi.dtype
    f = torch.randn(T, C, generator=g).to(dtype).to(device)
    h_post = (2 * torch.rand(T, n, generator=g)).to(cd).to(device)
    h_res = torch.rand(T, n, n, generator=g).to(cd).to(device)
    x_next, layer_input, hq, hr, proj, rstd = torch.ops.hcext.mhc_post_pre_fwd(f, x, h_post, h_res, phi, alpha, bias,
                                                                              *SCALARS)
    g_next = torch.randn(x_next.shape, generator=g).to(dtype).to(device)
    gy = torch.randn(layer_input.shape, generator=g).to(dtype).to(device)
    gq = torch.randn(hq.shape, generator=g).to(cd).to(device)
    gr = torch.randn(hr.shape, generator=g).to(cd).to(device)

    def backward(a, b):
        return torch.ops.hcext.mhc_post_pre_backward(
            g_next[a:b], gy[a:b], gq[a:b], gr[a:b], f[a:b], x[a:b], h_post[a:b], h_res[a:b], x_next[a:b], phi, alpha,
            bias, proj[a:b], rstd[a:b], SCALARS[0], SCALARS[2], SCALARS[3], SCALARS[4], [True, True, True, True])

    whole = backward(0, T)
    pieces = [backward(a, b) for a, b in _token_slices(T, 37)]
    exact = request.node.callspec.params["device"] == "cpu" or n <= 6
    for i, name in enumerate(("grad_f", "grad_x", "grad_h_post", "grad_h_res")):
        sliced = torch.cat([p[i] for p in pieces])
        if exact:
            assert torch.equal(whole[i], sliced), name
        else:
            assert_scaled_close(whole[i], sliced, whole[i].dtype, name=name)
    for i, name in ((4, "grad_phi"), (5, "grad_alpha"), (6, "grad_bias")):
        assert_scaled_close(whole[i], sum(p[i] for p in pieces), torch.float32, name=name)
