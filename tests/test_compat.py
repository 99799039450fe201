"""hcext.compat.hyper_connections against the original ``hyper-connections`` package.

Every comparison builds the original module, perturbs its parameters away from their
initial values (so that every coefficient path is live), loads its ``state_dict`` into the
compat module with ``strict=True``, runs both on the same input and compares the output and
the gradients of the input and of every parameter (fp32, within the suite's tolerance table:
tests/helpers.py, TOLERANCES).

Nothing is installed here: without the package the comparisons skip (CI installs it from
requirements-dev.txt).
"""

import copy
import random

import pytest
import torch
from torch import nn

from hcext.compat import hyper_connections as compat
from helpers import TOLERANCES, assert_close_dtype, assert_scaled_close, assert_within_twice_reference_error

H = pytest.importorskip("hyper_connections", reason="the original hyper-connections package is not installed")
from hyper_connections import manifold_constrained_hyper_connections as H_mc  # noqa: E402

# The table's fp32 row (not a tolerance of this file's own): kept under this name for the test
# files that import it from here (tests/test_compat_mhcv2.py).
TOL = TOLERANCES[torch.float32]


def perturb(module, scale=0.3):
    """Random, non-initial parameter values (the init zeros hide the dynamic paths)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def twin(orig_cls, new_cls, *args, device="cpu", **kwargs):
    """(original, compat) built with the same Python RNG state, compat loaded strictly from the original."""
    state = random.getstate()
    orig = orig_cls(*args, **kwargs).to(device)
    random.setstate(state)
    new = new_cls(*args, **kwargs).to(device)
    perturb(orig)
    assert set(orig.state_dict()) == set(new.state_dict())
    new.load_state_dict(orig.state_dict(), strict=True)
    return orig, new


def run(module, x, extra=(), call=None):
    """Forward + backward with a fixed non-uniform cotangent; returns output and all gradients."""
    x = x.clone().requires_grad_()
    out = call(module, x) if call is not None else module(x)
    y = out[0] if isinstance(out, tuple) else out
    weight = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).sin()
    (y * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    for e in extra:
        grads.update({f"extra.{name}": p.grad.clone() for name, p in e.named_parameters()})
    module.zero_grad()
    for e in extra:
        e.zero_grad()
    return y.detach(), x.grad, grads


def close(actual, expected, what):
    """The table's row of the tensors' dtype, the atol scaled by the tensor's largest value:
    gradients summed over tokens reach ~100, where one fp32 ulp is ~1e-5 (and both
    implementations are equally far from fp64)."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert_scaled_close(actual, expected, name=what)


def assert_same(a, b):
    ya, gxa, gpa = a
    yb, gxb, gpb = b
    close(yb, ya, "forward output")
    close(gxb, gxa, "input gradient")
    assert set(gpa) == set(gpb), (sorted(gpa), sorted(gpb))
    for name in gpa:
        close(gpb[name], gpa[name], f"gradient of {name}")


def branch_mode(lin):
    """The (branch_input, add_residual) calling convention around a shared linear branch."""

    def call(module, x):
        branch_input, add_residual = module(x)
        return add_residual(torch.tanh(lin(branch_input)))

    return call


def streams_input(n, dim, device, lead=(5,), batch=2):
    return torch.randn(batch * n, *lead, dim, device=device)


# ---------------------------------------------------------------------------------------
# Hyper-Connections


@pytest.mark.parametrize("tanh", [True, False])
@pytest.mark.parametrize("layer_index", [None, 2, 7])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_hc_add_residual_mode(device, tanh, layer_index, lead):
    n, dim = 4, 16
    orig, new = twin(H.HyperConnections, compat.HyperConnections, n, dim=dim, tanh=tanh, layer_index=layer_index,
                     device=device)
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device, lead)
    assert_same(run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin)))


@pytest.mark.parametrize("tanh", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_hc_branch_wrapping_mode(device, tanh, n):
    dim = 8
    branch = nn.Sequential(nn.Linear(dim, dim), nn.GELU()).to(device)
    orig, new = twin(H.HyperConnections, compat.HyperConnections, n, dim=dim, tanh=tanh, layer_index=1,
                     branch=branch, device=device)
    assert new.branch is branch and orig.branch is branch
    x = streams_input(n, dim, device)
    assert_same(run(orig, x), run(new, x))


def test_hc_decorate_branch_and_extra_outputs(device):
    """decorate_branch, extra branch arguments, and a branch returning (output, aux)."""
    n, dim = 4, 8
    orig, new = twin(H.HyperConnections, compat.HyperConnections, n, dim=dim, layer_index=3, device=device)
    lin = nn.Linear(dim, dim, device=device)

    def moe_like(x, scale, *, shift):
        out = lin(x) * scale + shift
        return out, out.pow(2).mean()  # an auxiliary loss rides along unchanged

    def call(module, x):
        out, aux = module.decorate_branch(moe_like)(x, 0.5, shift=0.1)
        return out + aux

    x = streams_input(n, dim, device)
    assert_same(run(orig, x, [lin], call), run(new, x, [lin], call))


def test_hc_without_branch_output_added(device):
    """add_branch_out_to_residual=False: no beta parameters, add_residual returns the branch output."""
    n, dim = 4, 8
    orig, new = twin(H.HyperConnections, compat.HyperConnections, n, dim=dim, layer_index=0,
                     add_branch_out_to_residual=False, device=device)
    assert not hasattr(new, "static_beta")
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device)
    assert_same(run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin)))


def test_hc_dropout_eval_and_fp64(device):
    n, dim = 4, 8
    orig, new = twin(H.HyperConnections, compat.HyperConnections, n, dim=dim, layer_index=0, dropout=0.5,
                     device=device)
    orig.eval(), new.eval()
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device)
    assert_same(run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin)))
    new.double(), orig.double(), lin.double()
    ya, yb = (branch_mode(lin)(m, x.double()) for m in (orig, new))
    assert yb.dtype == ya.dtype == torch.float64
    assert_scaled_close(yb, ya, name="fp64 output")


def test_hc_zero_stream_is_finite(device):
    """Their F.normalize clamps the norm: an all-zero token gives finite values, as here."""
    n, dim = 4, 8
    orig, new = twin(H.HyperConnections, compat.HyperConnections, n, dim=dim, layer_index=0, device=device)
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device)
    x[:, 1] = 0
    a, b = run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin))
    assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all()
    assert_same(a, b)


# ---------------------------------------------------------------------------------------
# mHC (the package's variant)

MHC_CASES = {
    "default": dict(),
    "iters5": dict(sinkhorn_iters=5),
    "iters0": dict(sinkhorn_iters=0),  # theirs: no normalisation, exp(logits - max)
    "log_domain": dict(log_domain_sinkhorn=True),
    "log_domain_iters0": dict(log_domain_sinkhorn=True, sinkhorn_iters=0),
    "proposals3": dict(num_dynamic_alpha_proposals=3),
    "no_branch_out": dict(add_branch_out_to_residual=False),
}


@pytest.mark.parametrize("case", list(MHC_CASES))
@pytest.mark.parametrize("layer_index", [None, 1])
def test_mhc_add_residual_mode(device, case, layer_index):
    n, dim = 4, 16
    orig, new = twin(H.mHC, compat.mHC, n, dim=dim, layer_index=layer_index, device=device, **MHC_CASES[case])
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device, (3,))
    assert_same(run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin)))


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_mhc_branch_wrapping_mode(device, n):
    dim = 8
    branch = nn.Sequential(nn.Linear(dim, dim), nn.SiLU()).to(device)
    orig, new = twin(H.mHC, compat.mHC, n, dim=dim, layer_index=0, branch=branch, device=device)
    x = streams_input(n, dim, device, (2, 3))
    assert_same(run(orig, x), run(new, x))


def test_mhc_residual_transform_and_custom_constraint(device):
    """residual_transform (a module with parameters) and a user residual_mix_constraint_fn."""
    n, dim = 4, 8

    def constraint(logits):  # softmax over destinations: row-stochastic in their [src, dst] layout
        return logits.softmax(dim=-1)

    torch.manual_seed(1)
    transform = nn.Linear(dim, dim).to(device)
    orig, new = twin(H.mHC, compat.mHC, n, dim=dim, layer_index=2, residual_transform=transform,
                     residual_mix_constraint_fn=constraint, device=device)
    assert "residual_transform.weight" in new.state_dict()
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device)
    assert_same(run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin)))


def test_mhc_forward_method_names(device):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

        def describe(self):
            return "block"

    new = compat.mHC(4, dim=8, branch=Block(), forward_method_names=("describe",))
    assert new.describe() == "block"


def test_mhc_h_res_is_their_sinkhorn(device):
    """The [src, dst] transpose: hcext's h_res[dst, src] equals their sinkhorn matrix transposed."""
    logits = torch.randn(7, 4, 4, device=device) * 3
    theirs = H_mc.sinkhorn_knopps(logits, iters=20)  # [src, dst]
    new = compat.mHC(4, dim=8, sinkhorn_iters=20)
    assert_close_dtype(new._constrain_residual(logits), theirs.mT)
    # their last step normalises each source's outgoing weights: hcext's columns sum to 1
    assert_close_dtype(new._constrain_residual(logits).sum(-2), torch.ones(7, 4, device=device))


@pytest.mark.parametrize("iters", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sinkhorn_functions_are_theirs(device, iters, dtype):
    """manifold_constrained_hyper_connections' sinkhorn_knopps / log_domain_sinkhorn_knopps,
    mirrored on hcext's kernel: their orientation, their dtype, their iters <= 0 behaviour."""
    from hcext.compat import manifold_constrained_hyper_connections as mc

    logits = (torch.randn(3, 5, 4, 4, device=device) * 2).to(dtype)
    for name in ("sinkhorn_knopps", "log_domain_sinkhorn_knopps"):
        ours, theirs = getattr(mc, name)(logits, iters=iters), getattr(H_mc, name)(logits, iters=iters)
        assert ours.dtype == theirs.dtype == dtype
        assert_close_dtype(ours, theirs)  # fp16: both round the same fp32 matrix once


def test_mhc_bf16_close(device):
    """bf16 streams: the suite's low-precision rule (helpers.assert_within_twice_reference_error):
    hcext's error against the package run in high precision is at most twice the package's own
    bf16 error (the fused kernel rounds once where the package rounds twice)."""
    n, dim = 4, 16
    orig, new = twin(H.mHC, compat.mHC, n, dim=dim, layer_index=0, device=device)
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device)
    # The package in fp64 (its coefficient math is fp32 whatever the dtype: far below bf16 rounding).
    y64 = branch_mode(copy.deepcopy(lin).double())(copy.deepcopy(orig).double(), x.double())
    lin = lin.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    ya, yb = (branch_mode(lin)(m, x) for m in (orig, new))
    assert yb.dtype == ya.dtype == torch.bfloat16
    assert_within_twice_reference_error(yb, y64, ya, name="bf16 output")


# ---------------------------------------------------------------------------------------
# expand / reduce, init functions, Residual, StreamEmbed, whole networks


@pytest.mark.parametrize("add_stream_embed", [False, True])
@pytest.mark.parametrize("pair", ["hc", "mc"])
def test_expand_reduce(device, add_stream_embed, pair):
    n, dim = 3, 8
    fn_orig = H.get_expand_reduce_stream_functions if pair == "hc" else H.mc_get_expand_reduce_stream_functions
    fn_new = compat.get_expand_reduce_stream_functions if pair == "hc" else compat.mc_get_expand_reduce_stream_functions
    torch.manual_seed(0)
    (eo, ro), (en, rn) = (f(n, add_stream_embed=add_stream_embed, dim=dim) for f in (fn_orig, fn_new))
    eo, ro, en, rn = (m.to(device) for m in (eo, ro, en, rn))
    if add_stream_embed:
        perturb(eo)
        en.load_state_dict(eo.state_dict(), strict=True)
    x = torch.randn(2, 5, dim, device=device)
    torch.testing.assert_close(en(x), eo(x))
    assert en(x).shape == (2 * n, 5, dim)
    y = torch.randn(2 * n, 5, dim, device=device)
    torch.testing.assert_close(rn(y), ro(y))
    # disabled: identities
    for m in fn_new(n, disable=True):
        assert isinstance(m, nn.Identity)


def test_stream_embed_and_attention_pool(device):
    n, dim = 4, 8
    for orig_cls, new_cls in ((H.StreamEmbed, compat.StreamEmbed), (H.AttentionPoolReduceStream, compat.AttentionPoolReduceStream)):
        for channel_first in (False, True):
            orig, new = twin(orig_cls, new_cls, n, dim, channel_first=channel_first, device=device)
            x = torch.randn(2 * n, dim, 3, device=device) if channel_first else torch.randn(2 * n, 3, dim, device=device)
            assert_same(run(orig, x), run(new, x))


def test_disable_gives_residual(device):
    for get_orig, get_new in ((H.get_init_and_expand_reduce_stream_functions, compat.get_init_and_expand_reduce_stream_functions),
                              (H.mc_get_init_and_expand_reduce_stream_functions, compat.mc_get_init_and_expand_reduce_stream_functions)):
        for kwargs in (dict(num_streams=1), dict(num_streams=4, disable=True)):
            init_o, expand_o, reduce_o = get_orig(dim=8, **kwargs)
            init_n, expand_n, reduce_n = get_new(dim=8, **kwargs)
            lin = nn.Linear(8, 8).to(device)
            new = init_n(branch=lin)
            assert isinstance(new, compat.Residual) and isinstance(expand_n, nn.Identity)
            orig = init_o(branch=lin)
            x = torch.randn(3, 8, device=device)
            assert_same(run(orig, x), run(new, x))
            bi, add = init_n()(x)
            assert bi is x
            torch.testing.assert_close(add(lin(x)), lin(x) + x)


@pytest.mark.parametrize("kind", ["hc", "mc"])
def test_whole_network(device, kind):
    """A small residual network built through the init functions, loss and all gradients equal."""
    n, dim, depth = 4, 16, 3
    get = {"hc": (H.get_init_and_expand_reduce_stream_functions, compat.get_init_and_expand_reduce_stream_functions),
           "mc": (H.mc_get_init_and_expand_reduce_stream_functions, compat.mc_get_init_and_expand_reduce_stream_functions)}[kind]

    def build(get_fns):
        init, expand, reduce = get_fns(n, dim=dim, add_stream_embed=True)
        torch.manual_seed(3)
        blocks = nn.ModuleList(
            init(branch=nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()), layer_index=i)
            for i in range(depth)
        )
        return nn.ModuleDict(dict(expand=expand, blocks=blocks, reduce=reduce)).to(device)

    orig, new = build(get[0]), build(get[1])
    perturb(orig, 0.1)  # smaller than for one module: values (and fp32 rounding) grow with depth
    new.load_state_dict(orig.state_dict(), strict=True)
    orig.load_state_dict(new.state_dict(), strict=True)  # and back

    def call(net, x):
        h = net["expand"](x)
        for block in net["blocks"]:
            h = block(h)
        return net["reduce"](h)

    x = torch.randn(2, 6, dim, device=device)
    assert_same(run(orig, x, call=call), run(new, x, call=call))


def test_static_methods_and_aliases():
    assert compat.mHC is compat.ManifoldConstrainedHyperConnections
    assert compat.HyperConnections.get_init_and_expand_reduce_stream_functions is compat.get_init_and_expand_reduce_stream_functions
    assert compat.mHC.get_init_and_expand_reduce_stream_functions is compat.mc_get_init_and_expand_reduce_stream_functions
    import hcext.compat as package

    for name in ("HyperConnections", "mHC", "Residual", "StreamEmbed", "get_init_and_expand_reduce_stream_functions",
                 "mc_get_init_and_expand_reduce_stream_functions", "mc_get_expand_reduce_stream_functions"):
        assert getattr(package, name) is getattr(compat, name)
    from hcext.compat import manifold_constrained_hyper_connections as mc

    assert mc.get_init_and_expand_reduce_stream_functions is compat.mc_get_init_and_expand_reduce_stream_functions
    assert mc.get_expand_reduce_stream_functions is compat.mc_get_expand_reduce_stream_functions
    assert mc.ManifoldConstrainedHyperConnections is compat.mHC


# ---------------------------------------------------------------------------------------
# unsupported arguments


@pytest.mark.parametrize("cls", [compat.HyperConnections, compat.mHC])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_fracs=2), "num_fracs"),
        (dict(channel_first=True), "channel_first"),
        (dict(num_input_views=2), "num_input_views"),
        (dict(depth_residual_fn=lambda out, res: out * res), "depth_residual_fn"),
    ],
)
def test_unsupported_arguments_raise(cls, kwargs, name):
    with pytest.raises(NotImplementedError, match=name):
        cls(4, dim=8, **kwargs)


def test_unsupported_through_init_function():
    init, _, _ = compat.get_init_and_expand_reduce_stream_functions(4, num_fracs=2, dim=8)
    with pytest.raises(NotImplementedError, match="num_fracs"):
        init()


@pytest.mark.parametrize("cls", ["HyperConnections", "mHC"])
def test_original_add_is_accepted(device, cls):
    """A depth_residual_fn that is addition (the package's own `add`, as code built against it
    passes, or operator.add) is accepted, kept, and gives the package's numbers."""
    import operator

    from hyper_connections.hyper_connections import add as their_add
    from hyper_connections.manifold_constrained_hyper_connections import add as their_mc_add

    fn = their_add if cls == "HyperConnections" else their_mc_add
    n, dim = 4, 8
    orig, new = twin(getattr(H, cls), getattr(compat, cls), n, dim=dim, layer_index=1, depth_residual_fn=fn,
                     device=device)
    assert new.depth_residual_fn is fn
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device)
    assert_same(run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin)))
    assert getattr(compat, cls)(n, dim=dim, depth_residual_fn=operator.add).depth_residual_fn is operator.add
    with pytest.raises(NotImplementedError, match="depth_residual_fn"):  # not addition: refused, not ignored
        getattr(compat, cls)(n, dim=dim, depth_residual_fn=lambda out, res: out - res)


# ---------------------------------------------------------------------------------------
# the package's modules that hcext.compat does not mirror: a clear ImportError each

UNMIRRORED = {
    "hyper_connections_channel_first": "hcext.compat.hyper_connections.HyperConnections",
    "hyper_connections_with_multi_input_streams": "hcext.compat.hyper_connections.HyperConnections",
    "hyper_connections_with_multi_branch_inputs": "hcext.compat.hyper_connections.HyperConnections",
    "vit": "hcext.compat.mHCv2",
    "triton_sinkhorn": "hcext.ops.sinkhorn",
    "residuals": "depth_residual_fn",
}


@pytest.mark.parametrize("name", list(UNMIRRORED))
def test_unmirrored_module_import_fails_clearly(name):
    import importlib
    import sys

    for attempt in range(2):  # and again: a failed import leaves nothing half-initialised behind
        with pytest.raises(ImportError) as info:
            importlib.import_module(f"hcext.compat.{name}")
        message = str(info.value)
        assert f"hcext.compat.{name} is not provided" in message
        assert UNMIRRORED[name] in message, message  # names what to use instead
        assert f"hyper_connections.{name}" in message  # and what it is in the package
        assert info.value.name == f"hcext.compat.{name}"
        assert f"hcext.compat.{name}" not in sys.modules
    # `from hcext.compat import <name>` fails the same way
    with pytest.raises(ImportError, match="is not provided"):
        exec(f"from hcext.compat import {name}", {})


def test_mirrored_modules_import():
    """The package's modules that hcext.compat mirrors, as ``hcext.compat.<same name>``."""
    from hcext.compat import hyper_connections, manifold_constrained_hyper_connections, mHCv2  # noqa: F401

    assert mHCv2.mHC is mHCv2.ManifoldConstrainedHyperConnections
    assert mHCv2.mHC is not hyper_connections.mHC  # the v2 layout ([..., s, d]) is its own class


@pytest.mark.parametrize("cls", [compat.HyperConnections, compat.mHC])
def test_compiles_without_graph_breaks(cls):
    """The compat modules trace in one graph (hcext's ops have fake kernels); aot_eager keeps it quick."""
    module = cls(4, dim=16, layer_index=0, branch=nn.Linear(16, 16))
    perturb(module)
    x = torch.randn(8, 5, 16)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert_close_dtype(compiled(x), module(x))
