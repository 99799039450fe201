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
