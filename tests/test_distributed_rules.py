"""The DTensor sharding rules of hcext's ops (hcext/ops/_sharding.py, issue 16), in this
process on a fake process group (torch's testing backend: no communication, so only
placements and local shapes are checked here; tests/test_distributed_parallel.py checks
the numbers on real gloo ranks).

The rule: token (leading) dims may be sharded and propagate; Replicate everywhere gives
Replicate; parameters and shared coefficients are Replicate and their gradients Partial
where the tokens are sharded; a sharded stream / channel dim or parameter raises an error
naming the op, the argument and the placement.
"""

import subprocess
import sys

import pytest
import torch

import hcext
from hcext.ops import _sharding

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

B, T, N, C = 4, 8, 4, 8
D = N * N + 2 * N


@pytest.fixture(scope="module")
def meshes():
    """A 1-D mesh of 4 ranks and a 2-D (2, 2) mesh, on a fake 4-rank process group (this
    process is rank 0)."""
    import torch.distributed as dist

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:
        pytest.skip("torch's fake process group is not available")
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        yield init_device_mesh("cpu", (4,)), init_device_mesh("cpu", (2, 2))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def mesh(meshes):
    return meshes[0]


def dt(t, mesh, *placements, grad=False):
    from torch.distributed.tensor import distribute_tensor

    out = distribute_tensor(t, mesh, list(placements))
    return out.requires_grad_() if grad else out


def S(d):
    from torch.distributed.tensor import Shard

    return Shard(d)


def R():
    from torch.distributed.tensor import Replicate

    return Replicate()


def P():
    from torch.distributed.tensor import Partial

    return Partial()


def mhc_params(mesh, *placements, grad=True):
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(N * C, D, generator=g) * 0.1
    return [dt(t, mesh, *placements, grad=grad) for t in (phi, torch.full((3,), 0.1), torch.zeros(D))]


def streams(mesh, *placements, lead=(B, T), grad=True):
    return dt(torch.randn(*lead, N, C), mesh, *placements, grad=grad)


def placements(*tensors):
    return [tuple(t.placements) for t in tensors]


# ---------------------------------------------------------------------------------------
# registration


def test_every_hcext_op_has_a_registered_rule(mesh):
    from torch.distributed.tensor import DTensor

    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("hcext::")}
    assert names, "no hcext ops registered"
    assert names <= set(_sharding.RULES), f"ops without a sharding rule: {sorted(names - set(_sharding.RULES))}"
    registered = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
    missing = [n for n in names if getattr(torch.ops.hcext, n).default not in registered]
    assert not missing, missing
    # The forward and backward ops of every family are among them.
    assert {"sinkhorn", "sinkhorn_backward", "stream_aggregate_backward", "stream_mix_expand_backward",
            "mhc_backward", "mhc_post_pre_backward", "hc_coeffs_backward"} <= names


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_hcext_does_not_import_dtensor_and_registers_when_it_is_imported():
    code = (
        "import sys, hcext\n"
        "assert 'torch.distributed.tensor' not in sys.modules, 'import hcext imported torch.distributed.tensor'\n"
        "from hcext.ops import _sharding\n"
        "assert not _sharding._registered\n"
        "import torch.distributed.tensor.parallel\n"  # a submodule: the package is imported first
        "assert _sharding._registered\n"
        "from torch.distributed.tensor import DTensor\n"
        "import torch\n"
        "assert torch.ops.hcext.mhc_pre_fwd.default in DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr


def test_import_hcext_works_without_torch_distributed():
    code = (
        "import torch\n"
        "torch.distributed.is_available = lambda: False\n"
        "import hcext\n"
        "from hcext.ops import _sharding\n"
        "assert _sharding.register_sharding_rules() is False\n"
        "x = torch.randn(3, 4, 8)\n"
        "hcext.ops.stream_aggregate(x, torch.full((4,), 0.25))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------
# propagation: Shard on token dims, Replicate, Partial parameter gradients


@pytest.mark.parametrize("token_dim", [0, 1])
def test_mhc_pre_shard_on_a_token_dim_propagates_and_parameter_grads_are_partial(mesh, token_dim):
    x = streams(mesh, S(token_dim))
    params = mhc_params(mesh, R())
    y, h_post, h_res = hcext.ops.mhc_pre(x, *params)
    assert placements(y, h_post, h_res) == [(S(token_dim),)] * 3
    assert y.shape == (B, T, C) and h_res.shape == (B, T, N, N)  # global shapes
    (y.sum() + h_post.sum() + h_res.sum()).backward()  # hcext::mhc_backward
    assert placements(x.grad) == [(S(token_dim),)]
    assert placements(*(p.grad for p in params)) == [(P(),)] * 3


def test_replicate_everywhere_gives_replicate(mesh):
    x = streams(mesh, R())
    params = mhc_params(mesh, R())
    y, h_post, h_res = hcext.ops.mhc_pre(x, *params)
    assert placements(y, h_post, h_res) == [(R(),)] * 3
    y.sum().backward()
    assert placements(x.grad, *(p.grad for p in params)) == [(R(),)] * 4


def test_two_d_mesh_shard_batch_and_sequence(meshes):
    _, mesh2 = meshes
    x = streams(mesh2, S(0), S(1))
    params = mhc_params(mesh2, R(), R())
    h_pre, h_post, h_res = hcext.ops.mhc_coeffs(x, *params)
    assert placements(h_pre, h_post, h_res) == [(S(0), S(1))] * 3
    (h_pre.sum() + h_res.sum()).backward()
    assert placements(x.grad) == [(S(0), S(1))]
    assert placements(*(p.grad for p in params)) == [(P(), P())] * 3


def test_two_d_mesh_sequence_sharded_on_one_mesh_dim_replicated_on_the_other(meshes):
    _, mesh2 = meshes
    x = streams(mesh2, R(), S(1))
    params = mhc_params(mesh2, R(), R())
    y, _, _ = hcext.ops.mhc_pre(x, *params)
    assert placements(y) == [(R(), S(1))]
    y.sum().backward()
    assert placements(*(p.grad for p in params)) == [(R(), P())] * 3


def test_mhc_post_pre_boundary_propagates(mesh):
    x = streams(mesh, S(1))
    f = dt(torch.randn(B, T, C), mesh, S(1), grad=True)
    h_post = dt(torch.rand(B, T, N), mesh, S(1), grad=True)
    h_res = dt(torch.rand(B, T, N, N), mesh, S(1), grad=True)
    params = mhc_params(mesh, R())
    outs = hcext.ops.mhc_post_pre(f, x, h_post, h_res, *params)
    assert placements(*outs) == [(S(1),)] * 4
    sum(o.sum() for o in outs).backward()  # hcext::mhc_post_pre_backward
    assert placements(f.grad, x.grad, h_post.grad, h_res.grad) == [(S(1),)] * 4
    assert placements(*(p.grad for p in params)) == [(P(),)] * 3


@pytest.mark.parametrize("shared", [False, True], ids=["per_token", "shared"])
def test_stream_ops_per_token_and_shared_coefficients(mesh, shared):
    x = streams(mesh, S(1))
    f = dt(torch.randn(B, T, C), mesh, S(1), grad=True)
    lead = () if shared else (B, T)
    coef_placement = R() if shared else S(1)
    h_pre = dt(torch.rand(*lead, N), mesh, coef_placement, grad=True)
    h_post = dt(torch.rand(*lead, N), mesh, coef_placement, grad=True)
    h_res = dt(torch.rand(*lead, N, N), mesh, coef_placement, grad=True)
    y = hcext.ops.stream_aggregate(x, h_pre)
    out = hcext.ops.stream_mix_expand(f, x, h_post, h_res)
    assert placements(y, out) == [(S(1),)] * 2
    (y.sum() + out.sum()).backward()
    assert placements(x.grad, f.grad) == [(S(1),)] * 2
    # The gradient of a coefficient shared by every token sums over the tokens: Partial.
    want = P() if shared else S(1)
    assert placements(h_pre.grad, h_post.grad, h_res.grad) == [(want,)] * 3


def test_backward_ops_with_output_mask(mesh):
    x = streams(mesh, S(1), grad=False)
    f = dt(torch.randn(B, T, C), mesh, S(1))
    grad = dt(torch.randn(B, T, N, C), mesh, S(1))
    h_post, h_res = dt(torch.rand(N), mesh, R()), dt(torch.rand(N, N), mesh, R())
    gf, gx, gp, gr = torch.ops.hcext.stream_mix_expand_backward(grad, f, x, h_post, h_res, [False, True, False, True])
    assert placements(gx, gr) == [(S(1),), (P(),)]
    assert gf.shape == (0,) and gp.shape == (0,)  # not requested: empty, Replicate
    assert placements(gf, gp) == [(R(),)] * 2
    # Same op, another mask: the cached propagation must not be reused.
    gf, gx, gp, gr = torch.ops.hcext.stream_mix_expand_backward(grad, f, x, h_post, h_res, [True, False, True, False])
    assert placements(gf, gp) == [(S(1),), (P(),)] and gx.shape == (0,) and gr.shape == (0,)
    gx, gh = torch.ops.hcext.stream_aggregate_backward(dt(torch.randn(B, T, C), mesh, S(1)), x, h_post, [True, False])
    assert placements(gx, gh) == [(S(1),), (R(),)] and gh.shape == (0,)


def test_sinkhorn_and_its_backward(mesh):
    logits = dt(torch.randn(B, T, N, N), mesh, S(0), grad=True)
    h = hcext.ops.sinkhorn(logits, 5)
    assert placements(h) == [(S(0),)]
    h.sum().backward()  # hcext::sinkhorn_backward
    assert placements(logits.grad) == [(S(0),)]


@pytest.mark.parametrize("kind", ["hc", "hc_static"])
def test_hc_coeffs_dynamic_and_static(mesh, kind):
    from hcext import init as hc_init

    params = hc_init.hc_dynamic(N, C, 1) if kind == "hc" else hc_init.hc_static(N, 1)
    params = {k: dt(v + 0.1 * torch.rand(v.shape), mesh, R(), grad=True) for k, v in params.items()}
    x = streams(mesh, S(1))
    h_pre, h_post, h_res = hcext.ops.hc_coeffs(x, params["static_alpha"], params["static_beta"],
                                               params.get("dynamic_alpha"), params.get("dynamic_beta"),
                                               params.get("alpha_scale"), params.get("beta_scale"),
                                               params.get("norm_weight"))
    want = S(1) if kind == "hc" else R()  # static HC: the shared [n], [n, n] copies of the parameters
    assert placements(h_pre, h_post, h_res) == [(want,)] * 3
    out = hcext.ops.stream_mix_expand(hcext.ops.stream_aggregate(x, h_pre), x, h_post, h_res)
    assert placements(out) == [(S(1),)]
    out.sum().backward()  # dynamic: hcext::hc_coeffs_backward
    assert placements(x.grad) == [(S(1),)]
    assert placements(*(p.grad for p in params.values())) == [(P(),)] * len(params)


def test_mhc_pre_shifted_with_the_shared_initial_pre_mix(mesh):
    if not hasattr(hcext.ops, "mhc_pre_shifted"):
        pytest.skip("this build has no shifted collapse")
    x = streams(mesh, S(1))
    pre_mix = dt(torch.eye(N)[0], mesh, R(), grad=True)  # e_0, shared by every token
    params = mhc_params(mesh, R())
    outs = hcext.ops.mhc_pre_shifted(x, pre_mix, *params)
    assert placements(*outs) == [(S(1),)] * 4
    sum(o.sum() for o in outs).backward()
    assert placements(x.grad, pre_mix.grad) == [(S(1),), (P(),)]
    assert placements(*(p.grad for p in params)) == [(P(),)] * 3


def test_partial_streams_are_reduced_first(mesh):
    # A Partial input (e.g. a row-parallel output not yet reduced) is reduced by DTensor
    # before the op (no op here is linear in all its inputs), never used as is.
    from torch.distributed.tensor import DTensor

    x = DTensor.from_local(torch.randn(B, T, N, C), mesh, [P()], run_check=False)
    y, h_post, _ = hcext.ops.mhc_pre(x, *mhc_params(mesh, R(), grad=False))
    assert all(p != P() for p in y.placements + h_post.placements)


# ---------------------------------------------------------------------------------------
# unsupported placements: an error naming the op, the argument and the placement


def _raises(fn, *fragments):
    with pytest.raises(RuntimeError) as info:
        fn()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("dim", [3, -1])
def test_streams_sharded_on_the_channel_dim_raise(mesh, dim):
    x = streams(mesh, S(dim), grad=False)
    _raises(lambda: hcext.ops.mhc_pre(x, *mhc_params(mesh, R(), grad=False)),
            "hcext::mhc_pre_fwd", "argument x", "Shard(dim=3)", "stream / channel")


def test_streams_sharded_on_the_stream_dim_raise(mesh):
    x = streams(mesh, S(2), grad=False)
    h_post, h_res = dt(torch.rand(B, T, N), mesh, S(1)), dt(torch.rand(B, T, N, N), mesh, S(1))
    f = dt(torch.randn(B, T, C), mesh, S(1))
    _raises(lambda: hcext.ops.stream_mix_expand(f, x, h_post, h_res),
            "hcext::stream_mix_expand", "argument x", "Shard(dim=2)")


def test_branch_output_sharded_on_the_channel_dim_raises(mesh):
    x = streams(mesh, S(1), grad=False)
    f = dt(torch.randn(B, T, C), mesh, S(2))
    _raises(lambda: hcext.ops.stream_mix_expand(f, x, dt(torch.rand(N), mesh, R()), dt(torch.rand(N, N), mesh, R())),
            "hcext::stream_mix_expand", "argument f", "Shard(dim=2)")


def test_per_token_coefficient_sharded_on_a_stream_dim_raises(mesh):
    x = streams(mesh, S(1), grad=False)
    h_res = dt(torch.rand(B, T, N, N), mesh, S(3))
    _raises(lambda: hcext.ops.stream_mix_expand(dt(torch.randn(B, T, C), mesh, S(1)), x,
                                                dt(torch.rand(B, T, N), mesh, S(1)), h_res),
            "hcext::stream_mix_expand", "argument h_res", "Shard(dim=3)")


def test_mhc_parameter_sharded_raises(mesh):
    x = streams(mesh, S(1), grad=False)
    phi, alpha, bias = mhc_params(mesh, R(), grad=False)
    phi = phi.redistribute(placements=[S(0)])
    _raises(lambda: hcext.ops.mhc_coeffs(x, phi, alpha, bias),
            "hcext::mhc_coeffs_fwd", "argument phi", "a parameter", "Shard(dim=0)")


def test_hc_parameter_sharded_raises(mesh):
    from hcext import init as hc_init

    p = hc_init.hc_dynamic(N, C, 0)
    x = streams(mesh, S(1), grad=False)
    _raises(lambda: hcext.ops.hc_coeffs(x, dt(p["static_alpha"], mesh, R()), dt(p["static_beta"], mesh, R()),
                                        dt(p["dynamic_alpha"], mesh, S(0))),
            "hcext::hc_coeffs_fwd", "argument dynamic_alpha", "Shard(dim=0)")


def test_shared_coefficient_sharded_raises(mesh):
    x = streams(mesh, S(1), grad=False)
    _raises(lambda: hcext.ops.stream_aggregate(x, dt(torch.rand(N), mesh, S(0))),
            "hcext::stream_aggregate", "argument h_pre", "shared by every token", "Shard(dim=0)")


def test_backward_op_with_a_channel_sharded_gradient_raises(mesh):
    x = streams(mesh, S(1), grad=False)
    grad = dt(torch.randn(B, T, N, C), mesh, S(3))
    f = dt(torch.randn(B, T, C), mesh, S(1))
    _raises(lambda: torch.ops.hcext.stream_mix_expand_backward(grad, f, x, dt(torch.rand(N), mesh, R()),
                                                               dt(torch.rand(N, N), mesh, R())),
            "hcext::stream_mix_expand_backward", "argument grad", "Shard(dim=3)")


def test_sinkhorn_logits_sharded_on_a_matrix_dim_raises(mesh):
    _raises(lambda: hcext.ops.sinkhorn(dt(torch.randn(B, N, N), mesh, S(2))),
            "hcext::sinkhorn", "argument logits", "Shard(dim=2)")


def test_two_d_mesh_error_names_the_mesh_dim(meshes):
    _, mesh2 = meshes
    x = streams(mesh2, S(1), S(3), grad=False)
    _raises(lambda: hcext.ops.mhc_pre(x, *mhc_params(mesh2, R(), R(), grad=False)),
            "argument x", "Shard(dim=3) on mesh dim 1")


# ---------------------------------------------------------------------------------------
# hcext.nn with DTensor streams


@pytest.mark.parametrize("kind", ["mhc", "hc", "hc_static"])
def test_hyper_connection_accepts_dtensor_streams(mesh, kind):
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    hc = hcext.nn.HyperConnection(C, N, kind=kind)
    x = streams(mesh, S(1))
    branch_input, add = hc(x)
    assert isinstance(branch_input, DTensor) and placements(branch_input) == [(S(1),)]
    out = add(branch_input * 2)
    assert placements(out) == [(S(1),)]
    out.sum().backward()
    # Plain parameters become Replicate DTensors inside; their gradients come back plain.
    for name, p in hc.named_parameters():
        assert p.grad is not None and not isinstance(p.grad, DTensor), name


def test_stack_and_stream_head_accept_dtensor_streams(mesh):
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    branches = [torch.nn.Identity() for _ in range(3)]
    stack = hcext.nn.HyperConnectionStack.from_branches(branches, C, N, recompute_block=2)
    x = streams(mesh, S(1))
    out = hcext.nn.StreamHead(C, N)(stack(x))
    assert isinstance(out, DTensor) and placements(out) == [(S(1),)]
    out.sum().backward()
    assert all(p.grad is not None for p in stack.parameters())


def test_shifted_collapse_stack_accepts_dtensor_streams(mesh):
    if not hasattr(hcext.nn, "shifted_collapse"):
        pytest.skip("this version has no shifted collapse")
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    branches = [torch.nn.Identity() for _ in range(3)]
    stack = hcext.nn.HyperConnectionStack.from_branches(branches, C, N, collapse="shifted", recompute_block=None)
    x = streams(mesh, S(1))
    out = hcext.nn.shifted_collapse(stack(x))  # the first layer's e_0 (plain) becomes a Replicate DTensor
    assert isinstance(out, DTensor) and placements(out) == [(S(1),)]
    out.sum().backward()
    assert placements(x.grad) == [(S(1),)]
    assert all(p.grad is not None for p in stack.parameters())


def test_branch_returning_a_plain_tensor_with_dtensor_streams_raises(mesh):
    hc = hcext.nn.HyperConnection(C, N, kind="mhc")
    branch_input, add = hc(streams(mesh, S(1), grad=False))
    with pytest.raises(TypeError, match="branch returned a plain torch.Tensor"):
        add(branch_input.to_local())
