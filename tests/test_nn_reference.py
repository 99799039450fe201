"""hcext.nn.HyperConnection against hcext/reference.py with perturbed parameters and every
constructor argument at a non-default value (each argument distinct, so that a swap of two
of them shows), forward and backward, in fp64."""

import pytest
import torch

import hcext
from hcext import reference as ref
from hcext.nn import HyperConnection

N, C, TOKENS = 4, 16, 6
F64 = torch.float64


def _perturb(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _compare(module, reference_coeffs, x, f):
    x = x.clone().requires_grad_(True)
    branch_input, add = module(x)
    out = add(f)
    params = dict(module.named_parameters())
    h_pre, h_post, h_res = reference_coeffs(x, params)
    ref_input = ref.stream_aggregate(x, h_pre)
    ref_out = ref.stream_mix_expand(f, x, h_post, h_res)
    torch.testing.assert_close(branch_input, ref_input, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    w1, w2 = torch.randn_like(out), torch.randn_like(branch_input)
    inputs = [x, *params.values()]
    got = torch.autograd.grad((out * w1).sum() + (branch_input * w2).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((ref_out * w1).sum() + (ref_input * w2).sum(), inputs, allow_unused=True)
    for name, a, b in zip(["x", *params], got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f"gradient of {name}")


MHC_ARGS = dict(sinkhorn_iters=7, norm_eps=1e-3, sinkhorn_eps=3e-2, pre_eps=0.1, post_mult=1.5, alpha_init=0.3)


def test_mhc_every_argument_against_reference():
    module = HyperConnection(C, N, kind="mhc", layer_index=3, **MHC_ARGS).double()
    assert torch.equal(module.alpha.detach(), torch.full((3,), 0.3).double())  # alpha_init (an fp32 parameter, cast)
    _perturb(module)
    a = {k: v for k, v in MHC_ARGS.items() if k != "alpha_init"}

    def coeffs(x, p):
        return ref.mhc_coeffs(x, p["phi"], p["alpha"], p["bias"], **a)

    _compare(module, coeffs, torch.randn(TOKENS, N, C, dtype=F64), torch.randn(TOKENS, C, dtype=F64))


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("use_tanh", [True, False])
def test_hc_dynamic_every_argument_against_reference(norm, use_tanh):
    module = HyperConnection(C, N, kind="hc", layer_index=2, norm=norm, use_tanh=use_tanh, norm_eps=1e-3).double()
    _perturb(module)

    def coeffs(x, p):
        return ref.hc_coeffs(x, p["static_alpha"], p["static_beta"], p.get("dynamic_alpha"), p.get("dynamic_beta"),
                             p.get("alpha_scale"), p.get("beta_scale"), p.get("norm_weight"), None, norm=norm,
                             norm_eps=1e-3, use_tanh=use_tanh)

    _compare(module, coeffs, torch.randn(TOKENS, N, C, dtype=F64), torch.randn(TOKENS, C, dtype=F64))


def test_hc_static_against_reference():
    module = HyperConnection(C, N, kind="hc_static", layer_index=5).double()
    _perturb(module)

    def coeffs(x, p):
        return ref.hc_coeffs(x, p["static_alpha"], p["static_beta"])

    _compare(module, coeffs, torch.randn(TOKENS, N, C, dtype=F64), torch.randn(TOKENS, C, dtype=F64))
