"""Second derivatives through hcext ops: supported where the backward is plain torch ops
(static HC), refused with an error naming the op everywhere else — never a silent zero.

Every op's backward is a fused kernel with no derivative of its own. Before the guard
(hcext/ops/_checks.py: first_order_only), ``torch.autograd.grad(..., create_graph=True)``
followed by a second backward returned zeros for the hcext part where the pure-PyTorch
reference gives non-zero second derivatives.
"""

import pytest
import torch

import hcext

N, C, TOKENS = 4, 8, 3
F64 = torch.float64


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=F64) * scale).requires_grad_(True)


def _mhc_params():
    D = N * N + 2 * N
    return _leaf(N * C, D, scale=0.1), _leaf(3, scale=0.5), _leaf(D, scale=0.5)


def _hc_dynamic_inputs():
    return dict(
        x=_leaf(TOKENS, N, C),
        static_alpha=_leaf(N, N + 1),
        static_beta=_leaf(N),
        dynamic_alpha=_leaf(C, N + 1, scale=0.1),
        dynamic_beta=_leaf(C, scale=0.1),
        alpha_scale=torch.tensor(0.3, dtype=F64, requires_grad=True),
        beta_scale=torch.tensor(0.2, dtype=F64, requires_grad=True),
    )


# (name the error must carry, a callable returning (outputs, differentiable inputs))
def _sinkhorn():
    logits = _leaf(TOKENS, N, N)
    return hcext.ops.sinkhorn(logits), [logits]


def _stream_aggregate():
    x, h = _leaf(TOKENS, N, C), _leaf(TOKENS, N)
    return hcext.ops.stream_aggregate(x, h), [x, h]


def _stream_mix_expand():
    f, x, hp, hr = _leaf(TOKENS, C), _leaf(TOKENS, N, C), _leaf(TOKENS, N), _leaf(TOKENS, N, N)
    return hcext.ops.stream_mix_expand(f, x, hp, hr), [f, x, hp, hr]


def _mhc_coeffs():
    x, (phi, alpha, bias) = _leaf(TOKENS, N, C), _mhc_params()
    return hcext.ops.mhc_coeffs(x, phi, alpha, bias), [x, phi, alpha, bias]


def _mhc_pre():
    x, (phi, alpha, bias) = _leaf(TOKENS, N, C), _mhc_params()
    return hcext.ops.mhc_pre(x, phi, alpha, bias), [x, phi, alpha, bias]


def _mhc_post_pre():
    f, x, hp, hr = _leaf(TOKENS, C), _leaf(TOKENS, N, C), _leaf(TOKENS, N), _leaf(TOKENS, N, N)
    phi, alpha, bias = _mhc_params()
    return hcext.ops.mhc_post_pre(f, x, hp, hr, phi, alpha, bias), [f, x, hp, hr, phi, alpha, bias]


def _hc_coeffs_dynamic():
    p = _hc_dynamic_inputs()
    return hcext.ops.hc_coeffs(**p), list(p.values())


REFUSED = {
    "hcext::sinkhorn": _sinkhorn,
    "hcext::stream_aggregate": _stream_aggregate,
    "hcext::stream_mix_expand": _stream_mix_expand,
    "hcext::mhc_coeffs": _mhc_coeffs,
    "hcext::mhc_pre": _mhc_pre,
    "hcext::mhc_post_pre": _mhc_post_pre,
    "hcext::hc_coeffs": _hc_coeffs_dynamic,
}


def _loss(outputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum((o.double() ** 2).sum() for o in outputs)


@pytest.mark.parametrize("op", sorted(REFUSED))
def test_double_backward_is_refused_naming_the_op(op):
    outputs, inputs = REFUSED[op]()
    grads = torch.autograd.grad(_loss(outputs), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{op} does not support double backward"):
        sum(g.sum() for g in grads).backward()


@pytest.mark.parametrize("op", sorted(REFUSED))
def test_first_order_gradient_unchanged_under_create_graph(op):
    torch.manual_seed(0)
    outputs, inputs = REFUSED[op]()
    plain = torch.autograd.grad(_loss(outputs), inputs, retain_graph=True)
    graphed = torch.autograd.grad(_loss(outputs), inputs, create_graph=True)
    for p, g in zip(plain, graphed):
        assert torch.equal(p, g.detach())


def test_plain_backward_has_no_error_node():
    outputs, inputs = _mhc_pre()
    grads = torch.autograd.grad(_loss(outputs), inputs)
    assert all(g.grad_fn is None and not g.requires_grad for g in grads)


def test_double_backward_refused_through_compile():
    logits = _leaf(TOKENS, N, N)

    @torch.compile(backend="eager")
    def gradient_penalty(t):
        (g,) = torch.autograd.grad(hcext.ops.sinkhorn(t).pow(2).sum(), t, create_graph=True)
        return g.pow(2).sum()

    with pytest.raises(RuntimeError, match="hcext::sinkhorn does not support double backward"):
        gradient_penalty(logits).backward()


def test_static_hc_supports_double_backward():
    # Static HC's coefficients are the parameters rearranged: its backward is torch ops, so
    # second derivatives are real (and checked numerically).
    x = torch.randn(TOKENS, N, C, dtype=F64)
    static_alpha, static_beta = _leaf(N, N + 1), _leaf(N)
    assert torch.autograd.gradgradcheck(lambda a, b: hcext.ops.hc_coeffs(x, a, b), (static_alpha, static_beta))


def _functorch_cases():
    # One op of each registration path (a plain op, and the two stream ops that the mHC
    # composites build on): every hcext op is registered the same way.
    logits = torch.randn(TOKENS, N, N, dtype=F64)
    x, h = torch.randn(TOKENS, N, C, dtype=F64), torch.randn(TOKENS, N, dtype=F64)
    f, hr = torch.randn(TOKENS, C, dtype=F64), torch.randn(TOKENS, N, N, dtype=F64)
    return {
        "sinkhorn": (lambda t: hcext.ops.sinkhorn(t).sum(), logits),
        "stream_aggregate": (lambda t: hcext.ops.stream_aggregate(t, h).sum(), x),
        "stream_mix_expand": (lambda t: hcext.ops.stream_mix_expand(f, t, h, hr).sum(), x),
    }


@pytest.mark.parametrize("op", ["sinkhorn", "stream_aggregate", "stream_mix_expand"])
def test_functorch_grad_is_refused(op):
    # torch.func's grad transform does not support ops registered with
    # torch.library.register_autograd in torch 2.14: it raises before computing anything, so
    # neither a first nor a second derivative can come out silently wrong (README: Second
    # derivatives). The message is torch's and does not name the op.
    fn, arg = _functorch_cases()[op]
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(fn)(arg)
