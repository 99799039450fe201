"""hcext.nn: the thin modules. Pre-Norm equivalence at init for every kind, the two call
modes, extra branch outputs, StreamHead, expand/reduce, and argument errors."""

import pytest
import torch

from hcext.nn import HyperConnection, StreamHead, expand_streams, reduce_streams
from helpers import assert_close_dtype, assert_scaled_close

KINDS = ["mhc", "hc", "hc_static"]


def mlp(C):
    return torch.nn.Sequential(torch.nn.RMSNorm(C), torch.nn.Linear(C, 2 * C), torch.nn.GELU(), torch.nn.Linear(2 * C, C))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_init_equals_pre_norm(kind, n):
    C = 16
    branches = [mlp(C) for _ in range(3)]
    hcs = [HyperConnection(C, n, kind=kind, branch=b, layer_index=i) for i, b in enumerate(branches)]
    h = torch.randn(2, 5, C)
    streams = expand_streams(h, n)
    for hc in hcs:
        streams = hc(streams)
    for b in branches:
        h = h + b(h)
    # Every stream carries the Pre-Norm residual stream (up to the 1e-6 epsilons of mHC).
    assert_close_dtype(streams, h.unsqueeze(-2).expand_as(streams))
    assert_scaled_close(reduce_streams(streams), n * h)


@pytest.mark.parametrize("kind", KINDS)
def test_branch_mode_equals_prepare_mode_with_extras(kind):
    C, n = 8, 4
    branch = mlp(C)
    wrapped = HyperConnection(C, n, kind=kind, branch=branch, layer_index=1)
    bare = HyperConnection(C, n, kind=kind, layer_index=1)
    bare.load_state_dict({k: v for k, v in wrapped.state_dict().items() if not k.startswith("branch.")})
    x = torch.randn(3, n, C)
    branch_input, add = bare(x)
    torch.testing.assert_close(wrapped(x), add(branch(branch_input)))

    class WithAux(torch.nn.Module):
        def forward(self, y):
            return branch(y), torch.tensor(7.0)

    out, aux = HyperConnection(C, n, kind=kind, branch=WithAux(), layer_index=1)(x)
    assert out.shape == x.shape and aux.item() == 7.0


@pytest.mark.parametrize("kind", KINDS)
def test_trains_and_gradients_reach_coefficients(kind):
    C, n = 8, 4
    hc = HyperConnection(C, n, kind=kind, branch=mlp(C))
    x = torch.randn(6, n, C) + torch.linspace(0, 1, n).view(n, 1)  # streams that differ
    hc(x).square().sum().backward()
    coeff_grads = [p.grad for name, p in hc.named_parameters() if not name.startswith("branch.")]
    assert all(g is not None and torch.isfinite(g).all() for g in coeff_grads)
    assert any(g.abs().sum() > 0 for g in coeff_grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_module_dtypes(kind, dtype):
    C, n = 8, 4
    hc = HyperConnection(C, n, kind=kind, branch=mlp(C)).to(dtype)
    x = torch.randn(3, n, C, dtype=dtype)
    out = hc(x)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    h_pre, h_post, h_res = hc.coefficients(x)
    assert h_res.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_stream_head_is_the_mean_at_init_and_learns():
    C, n = 8, 4
    head = StreamHead(C, n)
    x = torch.randn(5, n, C, requires_grad=True)
    out = head(x)
    assert_close_dtype(out, x.mean(-2).detach())
    out.square().sum().backward()
    assert head.fn.grad.abs().sum() > 0 and x.grad is not None
    head64 = StreamHead(C, n).double()
    assert head64(x.detach().double()).dtype == torch.float64


def test_expand_and_reduce_streams():
    h = torch.randn(2, 3, 8)
    s = expand_streams(h, 4)
    assert s.shape == (2, 3, 4, 8) and s.is_contiguous()
    torch.testing.assert_close(reduce_streams(s), 4 * h)


def test_argument_errors():
    with pytest.raises(ValueError, match="kind"):
        HyperConnection(8, 4, kind="dense")
    with pytest.raises(ValueError, match="norm"):
        HyperConnection(8, 4, kind="hc", norm="batch")
    with pytest.raises(ValueError, match="num_streams"):
        HyperConnection(8, 33)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 8\]"):
        HyperConnection(8, 4)(torch.randn(3, 2, 8))
