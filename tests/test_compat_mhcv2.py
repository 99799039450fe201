"""hcext.compat.mHCv2 against the package's ``hyper_connections.mHCv2`` (its newer mHC, streams
in their own dim ``[..., s, d]``): same parameters (``strict=True`` loads both ways), same
outputs and gradients in fp32 (the comparison helpers of tests/test_compat.py), both calling
conventions, the expand/reduce functions, and the package's example ViT running on the compat
module. The public width/depth methods are driven by hand in tests/test_compat_methods.py.
"""

import random

import pytest
import torch
from torch import nn

from helpers import assert_close_dtype
from test_compat import TOL, assert_same, branch_mode, perturb, run, twin

from hcext.compat import mHCv2 as compat

V = pytest.importorskip("hyper_connections.mHCv2", reason="the original hyper-connections package (mHCv2) is missing")


def streams_input(n, dim, device, lead=(5,), batch=2):
    return torch.randn(batch, *lead, n, dim, device=device)


def logits_softmax_constraint(logits):  # row-stochastic in their [src, dst] layout
    return logits.softmax(dim=-1)


CASES = {
    "default": dict(),
    "iters5": dict(sinkhorn_iters=5),
    "iters0-unconstrained": dict(sinkhorn_iters=0),
    "log_domain": dict(log_domain_sinkhorn=True),
    "triton-flag": dict(use_triton_sinkhorn=True),  # theirs falls back without Triton: the same matrix
    "proposals3": dict(num_dynamic_alpha_proposals=3),
    "no_branch_out": dict(add_branch_out_to_residual=False),
    "mix_before_norm": dict(mix_streams_before_norm=True),
    "custom_constraint": dict(residual_mix_constraint_fn=logits_softmax_constraint),
}


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_is_the_package(case):
    random.seed(0)
    orig = V.mHC(4, dim=8, **CASES[case])
    random.seed(0)
    new = compat.mHC(4, dim=8, **CASES[case])
    assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in orig.state_dict().items()}
    for a, b in ((orig, new), (new, orig)):  # their checkpoint into hcext, and back; init values equal
        b.load_state_dict(a.state_dict(), strict=True)
    for k, v in orig.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layer_index", [None, 2])
def test_add_residual_mode(device, case, layer_index):
    n, dim = 4, 16
    orig, new = twin(V.mHC, compat.mHC, n, dim=dim, layer_index=layer_index, device=device, **CASES[case])
    lin = nn.Linear(dim, dim, device=device)
    x = streams_input(n, dim, device, (3,))
    assert_same(run(orig, x, [lin], branch_mode(lin)), run(new, x, [lin], branch_mode(lin)))


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_branch_wrapping_mode(device, n):
    dim = 8
    branch = nn.Sequential(nn.Linear(dim, dim), nn.SiLU()).to(device)
    orig, new = twin(V.mHC, compat.mHC, n, dim=dim, layer_index=0, branch=branch, device=device)
    x = streams_input(n, dim, device, (2, 3))
    assert_same(run(orig, x), run(new, x))


def test_residual_transform_decorate_branch_and_dropout_eval(device):
    n, dim = 4, 8
    torch.manual_seed(1)
    transform = nn.Linear(dim, dim).to(device)
    orig, new = twin(V.mHC, compat.mHC, n, dim=dim, layer_index=1, residual_transform=transform, dropout=0.3,
                     device=device)
    orig.eval(), new.eval()
    lin = nn.Linear(dim, dim, device=device)

    def call(module, x):
        out, aux = module.decorate_branch(lambda t, s: (lin(t) * s, t.mean()))(x, 0.5)
        return out + aux

    x = streams_input(n, dim, device)
    assert_same(run(orig, x, [lin], call), run(new, x, [lin], call))


def test_bf16_close(device):
    n, dim = 4, 16
    orig, new = twin(V.mHC, compat.mHC, n, dim=dim, layer_index=0, device=device)
    lin = nn.Linear(dim, dim, device=device).to(torch.bfloat16)
    x = streams_input(n, dim, device).to(torch.bfloat16)
    ya, yb = (branch_mode(lin)(m, x) for m in (orig, new))
    assert yb.dtype == ya.dtype == torch.bfloat16
    # the package rounds H_res x and beta * f separately, hcext their sum once: within the
    # table's bf16 row (one rounding of values equal in fp32, plus headroom)
    assert_close_dtype(yb.float(), ya.float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("iters", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sinkhorn_functions_are_theirs(device, iters, dtype):
    logits = (torch.randn(3, 5, 4, 4, device=device) * 2).to(dtype)
    for name in ("sinkhorn_knopps", "log_domain_sinkhorn_knopps"):
        ours, theirs = getattr(compat, name)(logits, iters=iters), getattr(V, name)(logits, iters=iters)
        assert ours.dtype == theirs.dtype == dtype
        assert_close_dtype(ours, theirs)


@pytest.mark.parametrize("add_stream_embed", [False, True])
@pytest.mark.parametrize("add_attn_pool_reduce_stream", [False, True])
def test_expand_reduce(device, add_stream_embed, add_attn_pool_reduce_stream):
    n, dim = 3, 8
    kwargs = dict(add_stream_embed=add_stream_embed, add_attn_pool_reduce_stream=add_attn_pool_reduce_stream, dim=dim)
    torch.manual_seed(0)
    eo, ro = (m.to(device) for m in V.get_expand_reduce_stream_functions(n, **kwargs))
    torch.manual_seed(0)
    en, rn = (m.to(device) for m in compat.get_expand_reduce_stream_functions(n, **kwargs))
    for o, m in ((eo, en), (ro, rn)):
        perturb(o)
        m.load_state_dict(o.state_dict(), strict=True)
    x = torch.randn(2, 5, dim, device=device)
    assert en(x).shape == (2, 5, n, dim)
    assert_close_dtype(en(x), eo(x))
    y = torch.randn(2, 5, n, dim, device=device)
    assert_close_dtype(rn(y), ro(y))
    assert all(isinstance(m, nn.Identity) for m in compat.get_expand_reduce_stream_functions(n, disable=True))


def test_init_functions_and_disable(device):
    for kwargs in (dict(num_streams=1), dict(num_streams=4, disable=True)):
        init, expand, reduce = compat.get_init_and_expand_reduce_stream_functions(dim=8, **kwargs)
        assert isinstance(init(), compat.Residual) and isinstance(expand, nn.Identity)
    init, _, _ = compat.get_init_and_expand_reduce_stream_functions(4, dim=8, use_triton_sinkhorn=True,
                                                                   num_dynamic_alpha_proposals=2)
    module = init(layer_index=0)
    assert isinstance(module, compat.mHC) and module.use_triton_sinkhorn and module.num_dynamic_alpha_proposals == 2
    assert compat.mHC.get_init_and_expand_reduce_stream_functions is compat.get_init_and_expand_reduce_stream_functions
    assert compat.mHC is compat.ManifoldConstrainedHyperConnections


@pytest.mark.parametrize("add_stream_embed", [False, True])
def test_whole_network(device, add_stream_embed):
    n, dim, depth = 4, 16, 3

    def build(module):
        init, expand, reduce = module.get_init_and_expand_reduce_stream_functions(
            n, dim=dim, add_stream_embed=add_stream_embed, add_attn_pool_reduce_stream=add_stream_embed)
        torch.manual_seed(3)
        blocks = nn.ModuleList(
            init(branch=nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()), layer_index=i)
            for i in range(depth)
        )
        return nn.ModuleDict(dict(expand=expand, blocks=blocks, reduce=reduce)).to(device)

    orig, new = build(V), build(compat)
    perturb(orig, 0.1)
    new.load_state_dict(orig.state_dict(), strict=True)

    def call(net, x):
        h = net["expand"](x)
        for block in net["blocks"]:
            h = block(h)
        return net["reduce"](h)

    x = torch.randn(2, 6, dim, device=device)
    assert_same(run(orig, x, call=call), run(new, x, call=call))


def test_package_vit_on_compat_mhc(device, monkeypatch):
    """What hcext.compat.vit's ImportError recommends: the package's ViT with mHC taken from
    hcext.compat.mHCv2 loads the package ViT's checkpoint strictly and gives the same numbers."""
    vit = pytest.importorskip("hyper_connections.vit")
    kwargs = dict(image_size=8, patch_size=4, num_classes=5, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)
    torch.manual_seed(0)
    random.seed(0)
    orig = vit.ViT(**kwargs).to(device)
    monkeypatch.setattr(vit, "mHC", compat.mHC)
    new = vit.ViT(**kwargs).to(device)
    assert isinstance(new.transformer.layers[0][0], compat.mHC)
    perturb(orig, 0.1)
    new.load_state_dict(orig.state_dict(), strict=True)
    img = torch.randn(2, 3, 8, 8, device=device)
    assert_same(run(orig, img), run(new, img))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_fracs=2), "num_fracs"),
        (dict(num_input_views=2), "num_input_views"),
        (dict(depth_residual_fn=lambda out, res: out * res), "depth_residual_fn"),
    ],
)
def test_unsupported_arguments_raise(kwargs, name):
    with pytest.raises(NotImplementedError, match=f"hcext.compat.mHCv2.ManifoldConstrainedHyperConnections: {name}"):
        compat.mHC(4, dim=8, **kwargs)


def test_same_signature_as_the_package():
    import inspect

    for name in ("ManifoldConstrainedHyperConnections", "StreamEmbed", "AttentionPoolReduceStream",
                 "get_expand_reduce_stream_functions", "get_init_and_expand_reduce_stream_functions"):
        ours, theirs = getattr(compat, name), getattr(V, name)
        ours = ours.__init__ if inspect.isclass(ours) else ours
        theirs = theirs.__init__ if inspect.isclass(theirs) else theirs
        def params(f):  # (the default depth_residual_fn is each module's own `add`)
            return [(p.name, p.kind, "fn" if callable(p.default) else p.default)
                    for p in inspect.signature(f).parameters.values()]

        assert params(ours) == params(theirs), name
    with pytest.raises(TypeError):  # mHCv2 has no channel_first argument, here neither
        compat.mHC(4, dim=8, channel_first=False)


def test_wrong_layout_fails_clearly():
    module = compat.mHC(4, dim=8)
    with pytest.raises(ValueError, match=r"expected residuals of shape \[\.\.\., 4, d\]"):
        module(torch.randn(8, 3, 8))  # the folded layout of hcext.compat.hyper_connections


def test_compiles_without_graph_breaks():
    module = compat.mHC(4, dim=16, layer_index=0, branch=nn.Linear(16, 16), mix_streams_before_norm=True)
    perturb(module)
    x = torch.randn(2, 5, 4, 16)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), **TOL)
