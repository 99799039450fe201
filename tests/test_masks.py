"""Every output mask of every backward op, and every partial requires_grad of every public op.

Output masks: every combination of output_mask of each backward op that takes one
(stream_aggregate_backward [2], stream_mix_expand_backward [4], mhc_post_pre_backward [4],
mhc_post_pre_shifted_backward [5], hc_coeffs_backward [9]: 2 + 16 + 16 + 32 + 512 masks per
configuration). A requested gradient must equal the one computed with every gradient requested
(torch.equal: the mask only skips work, it changes no arithmetic), an unrequested one is an
empty [0] tensor, and the gradients the mask does not cover (the boundary ops' phi, alpha,
bias) are always the full ones. The fake kernels give the same shapes for every mask.

Partial requires_grad: for every public op, every non-empty subset of its differentiable
inputs requires grad; a backward through autograd gives each of those inputs the gradient of
the run where every input requires grad (torch.equal), leaves the others' .grad None, and
calls the backward op once with output_mask = which inputs need a gradient.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Sequence

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import hcext  # noqa: F401
from hcext import ops

HC = torch.ops.hcext
N, C, T = 4, 8, 3
D = N * N + 2 * N
SCALARS = (3, 1e-6, 1e-6, 1e-6, 2.0)  # sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult
BACKWARD_SCALARS = (3, 1e-6, 1e-6, 2.0)  # sinkhorn_iters, sinkhorn_eps, pre_eps, post_mult
HC_OPTIONAL = ("dynamic_alpha", "dynamic_beta", "alpha_scale", "beta_scale", "norm_weight", "norm_bias")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes: one thread (waking a thread pool costs more than the work, and on a busy
    # machine much more). The masks and the gradients do not depend on the thread count
    # (tested elsewhere: tests/test_coverage.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tensors(device, shared: bool = False) -> Dict[str, torch.Tensor]:
    """Valid inputs of every op: n = 4, C = 8, 3 tokens, fp32. ``shared``: the stream-op
    coefficients (h_pre, h_post, h_res, pre_mix) shared by every token ([n], [n, n])."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    lead = () if shared else (T,)
    t = dict(
        x=r(T, N, C), f=r(T, C), h_pre=torch.rand(*lead, N, generator=g), h_post=2 * torch.rand(*lead, N, generator=g),
        h_res=torch.softmax(r(*lead, N, N), -1), pre_mix=torch.rand(*lead, N, generator=g), phi=r(N * C, D) * 0.2,
        alpha=torch.tensor([0.7, 0.5, 0.6]), bias=r(D) * 0.5, logits=r(T, N, N),
        static_alpha=r(N, N + 1), static_beta=r(N), dynamic_alpha=r(C, N + 1) * 0.3, dynamic_beta=r(C) * 0.3,
        alpha_scale=torch.tensor(0.5), beta_scale=torch.tensor(0.7), norm_weight=1 + 0.2 * r(C),
        norm_bias=0.2 * r(C),
    )
    return {k: v.to(device) for k, v in t.items()}


def _like(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g).to(t.device, t.dtype)


def _masks(k: int) -> List[List[bool]]:
    return [list(m) for m in itertools.product([False, True], repeat=k)]


def _fake_shapes(fn, args) -> List[torch.Size]:
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return [o.shape for o in fn(*fake)]


def _check_masks(fn, args: Sequence, k: int, always: int = 0, absent: Sequence[int] = (), fake: bool = True):
    """fn(*args, mask) for every mask of length k: gradients 0..k-1 masked, ``always`` more
    after them computed whatever the mask; the gradients at ``absent`` (inputs not given)
    empty whatever the mask."""
    full = fn(*args, [True] * k)
    assert len(full) == k + always
    for i, g in enumerate(full):
        if i in absent:
            assert g.shape == (0,), (i, g.shape)
        else:
            assert g.numel() > 0 and torch.isfinite(g).all(), i
    failures = []
    for mask in _masks(k):
        out = fn(*args, mask)
        for i, (g, want) in enumerate(zip(out, full)):
            wanted = i >= k or (mask[i] and i not in absent)
            if wanted and not torch.equal(g, want):
                failures.append(f"mask {mask}: gradient {i} differs from the full one")
            if not wanted and g.shape != (0,):
                failures.append(f"mask {mask}: gradient {i} not requested but of shape {tuple(g.shape)}")
        if fake:
            shapes = _fake_shapes(fn, [*args, mask])
            if shapes != [g.shape for g in out]:
                failures.append(f"mask {mask}: fake kernel shapes {shapes} vs {[g.shape for g in out]}")
    assert not failures, "\n".join(failures[:20])


# ---------------------------------------------------------------------------------------
# output_mask of every backward op


@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
def test_stream_aggregate_backward_masks(device, shared):
    t = _tensors(device, shared)
    grad = _like(t["f"], 1)
    _check_masks(HC.stream_aggregate_backward.default, [grad, t["x"], t["h_pre"]], 2)


@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
def test_stream_mix_expand_backward_masks(device, shared):
    t = _tensors(device, shared)
    grad = _like(t["x"], 1)
    _check_masks(HC.stream_mix_expand_backward.default, [grad, t["f"], t["x"], t["h_post"], t["h_res"]], 4)


def _boundary_backward_args(t, shifted: bool, grads: str = "all"):
    """The boundary backward ops' arguments: saved tensors from the _fwd op, incoming gradients
    ``grads``: "all", "x_next" (only grad_x_next: no coefficient path) or "coefficients" (no
    grad_x_next)."""
    f, x, h_post, h_res, pre_mix = t["f"], t["x"], t["h_post"], t["h_res"], t["pre_mix"]
    params = (t["phi"], t["alpha"], t["bias"])
    if shifted:
        x_next, *_, proj, rstd = HC.mhc_post_pre_shifted_fwd(f, x, h_post, h_res, pre_mix, *params, *SCALARS)
    else:
        x_next, *_, proj, rstd = HC.mhc_post_pre_fwd(f, x, h_post, h_res, *params, *SCALARS)
    g_x_next = _like(x, 1) if grads in ("all", "x_next") else None
    coef = grads in ("all", "coefficients")
    g_li = _like(f, 2) if coef else None
    g_hp = _like(torch.empty(T, N, device=x.device), 3) if coef else None
    g_hr = _like(torch.empty(T, N, N, device=x.device), 4) if coef else None
    if shifted:
        g_npm = _like(torch.empty(T, N, device=x.device), 5) if coef else None
        return [g_x_next, g_li, g_hp, g_hr, g_npm, f, x, h_post, h_res, pre_mix, x_next, *params, proj, rstd,
                *BACKWARD_SCALARS]
    return [g_x_next, g_li, g_hp, g_hr, f, x, h_post, h_res, x_next, *params, proj, rstd, *BACKWARD_SCALARS]


@pytest.mark.parametrize("grads", ["all", "x_next", "coefficients"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
def test_mhc_post_pre_backward_masks(device, shared, grads):
    t = _tensors(device, shared)
    _check_masks(HC.mhc_post_pre_backward.default, _boundary_backward_args(t, False, grads), 4, always=3)


@pytest.mark.parametrize("grads", ["all", "x_next", "coefficients"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-token", "shared"])
def test_mhc_post_pre_shifted_backward_masks(device, shared, grads):
    t = _tensors(device, shared)
    _check_masks(HC.mhc_post_pre_shifted_backward.default, _boundary_backward_args(t, True, grads), 5, always=3)


# Which optional HC inputs are given: all of them, and a sparser set (no dynamic_beta, no
# scales, no norm bias), and dynamic_beta alone.
HC_PRESENT = {
    "all": HC_OPTIONAL,
    "alpha+weight": ("dynamic_alpha", "norm_weight"),
    "beta-only": ("dynamic_beta", "beta_scale", "norm_bias"),
}


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("present", list(HC_PRESENT))
def test_hc_coeffs_backward_masks(device, present, norm):
    """All 2^9 = 512 masks (the fake kernel's shapes checked for a covering subset: every mask
    with at most two gradients off, and all-off)."""
    t = _tensors(device)
    optional = [t[k] if k in HC_PRESENT[present] else None for k in HC_OPTIONAL]
    x = t["x"]
    *outs, proj, stats = HC.hc_coeffs_fwd(x, t["static_alpha"], t["static_beta"], *optional, norm, 1e-5, True)
    grads = [_like(o, 10 + i) for i, o in enumerate(outs)]
    args = [x, t["static_alpha"], t["static_beta"], *optional, proj, stats, *grads, norm, True]
    absent = [3 + i for i, o in enumerate(optional) if o is None]
    _check_masks(HC.hc_coeffs_backward.default, args, 9, absent=absent, fake=False)
    fn = HC.hc_coeffs_backward.default
    for mask in _masks(9):
        if sum(mask) >= 7 or not any(mask):
            shapes = _fake_shapes(fn, [*args, mask])
            assert shapes == [g.shape for g in fn(*args, mask)], mask


def test_hc_coeffs_backward_masks_with_absent_gradients(device):
    """Incoming gradients None (zero): every mask still gives the full run's gradients."""
    t = _tensors(device)
    optional = [t[k] for k in HC_OPTIONAL]
    *outs, proj, stats = HC.hc_coeffs_fwd(t["x"], t["static_alpha"], t["static_beta"], *optional, "rms", 1e-5, False)
    for keep in range(3):
        grads = [_like(o, 20 + i) if i == keep else None for i, o in enumerate(outs)]
        args = [t["x"], t["static_alpha"], t["static_beta"], *optional, proj, stats, *grads, "rms", False]
        _check_masks(HC.hc_coeffs_backward.default, args, 9, fake=False)


# ---------------------------------------------------------------------------------------
# Partial requires_grad through autograd


class _RecordBackwardOps(TorchDispatchMode):
    """Records the calls of hcext's backward ops: (name, output_mask or None)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("hcext::") and name.split("::")[1].split(".")[0].endswith("backward"):
            schema = func._schema.arguments
            mask = None
            if schema[-1].name == "output_mask":
                # An argument equal to its default ([True] * k) reaches the mode dropped.
                mask = kwargs.get("output_mask", args[-1] if len(args) == len(schema) else schema[-1].default_value)
                mask = [bool(m) for m in mask]
            self.calls.append((name.split("::")[1].split(".")[0], mask))
        return func(*args, **kwargs)


def _public_ops(device) -> Dict[str, tuple]:
    """{name: (fn, {differentiable input: tensor}, the other arguments as a function of the
    inputs, the backward op and, for masked ones, the inputs its output_mask covers)}"""
    t = _tensors(device)
    mhc_params = ("phi", "alpha", "bias")
    pick = lambda *names: {k: t[k] for k in names}  # noqa: E731
    hc_full = pick("x", "static_alpha", "static_beta", *HC_OPTIONAL)
    return {
        "sinkhorn": (lambda logits: ops.sinkhorn(logits, 3), pick("logits"), "sinkhorn_backward", None),
        "stream_aggregate": (ops.stream_aggregate, pick("x", "h_pre"), "stream_aggregate_backward", ("x", "h_pre")),
        "stream_mix_expand": (ops.stream_mix_expand, pick("f", "x", "h_post", "h_res"), "stream_mix_expand_backward",
                              ("f", "x", "h_post", "h_res")),
        "mhc_coeffs": (lambda *a: ops.mhc_coeffs(*a, *SCALARS), pick("x", *mhc_params), "mhc_backward", None),
        "mhc_pre": (lambda *a: ops.mhc_pre(*a, *SCALARS), pick("x", *mhc_params), "mhc_backward", None),
        "mhc_post_pre": (lambda *a: ops.mhc_post_pre(*a, *SCALARS), pick("f", "x", "h_post", "h_res", *mhc_params),
                         "mhc_post_pre_backward", ("f", "x", "h_post", "h_res")),
        "mhc_pre_shifted": (lambda *a: ops.mhc_pre_shifted(*a, *SCALARS), pick("x", "pre_mix", *mhc_params),
                            "mhc_shifted_backward", None),
        "mhc_post_pre_shifted": (lambda *a: ops.mhc_post_pre_shifted(*a, *SCALARS),
                                 pick("f", "x", "h_post", "h_res", "pre_mix", *mhc_params),
                                 "mhc_post_pre_shifted_backward", ("f", "x", "h_post", "h_res", "pre_mix")),
        "hc_coeffs": (lambda *a: ops.hc_coeffs(*a, norm="layer", norm_eps=1e-5), hc_full, "hc_coeffs_backward",
                      tuple(hc_full)),
        "hc_coeffs-alpha-only": (lambda x, sa, sb, da, nw: ops.hc_coeffs(x, sa, sb, da, None, None, None, nw),
                                 pick("x", "static_alpha", "static_beta", "dynamic_alpha", "norm_weight"),
                                 "hc_coeffs_backward", ("x", "static_alpha", "static_beta", "dynamic_alpha", "-", "-",
                                                        "-", "norm_weight")),
        # static HC: x is an input but no gradient flows to it; the backward is plain torch ops
        "hc_coeffs-static": (ops.hc_coeffs, pick("x", "static_alpha", "static_beta"), None, None),
    }


def _run(fn, inputs: Dict[str, torch.Tensor], wanted: Sequence[str]):
    """Forward with ``wanted`` requiring grad, backward of sum_k sum(w_k * out_k); returns
    ({input: .grad}, the backward op calls)."""
    leaves = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in inputs.items()}
    with _RecordBackwardOps() as rec:
        outs = fn(*leaves.values())
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        loss = sum((o * _like(o, 100 + i)).sum() for i, o in enumerate(outs) if o.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    return {k: v.grad for k, v in leaves.items()}, rec.calls


@pytest.mark.parametrize("name", ["sinkhorn", "stream_aggregate", "stream_mix_expand", "mhc_coeffs", "mhc_pre",
                                  "mhc_post_pre", "mhc_pre_shifted", "mhc_post_pre_shifted", "hc_coeffs",
                                  "hc_coeffs-alpha-only", "hc_coeffs-static"])
def test_partial_requires_grad(device, name):
    fn, inputs, backward_op, masked = _public_ops(device)[name]
    names = list(inputs)
    full, _ = _run(fn, inputs, names)
    subsets = [s for k in range(1, len(names) + 1) for s in itertools.combinations(names, k)]
    failures = []
    for subset in subsets:
        grads, calls = _run(fn, inputs, subset)
        for k in names:
            got, want = grads[k], full[k]
            if k not in subset:
                if got is not None:
                    failures.append(f"{subset}: {k} does not require grad but got a gradient")
            elif (got is None) != (want is None) or (got is not None and not torch.equal(got, want)):
                failures.append(f"{subset}: the gradient of {k} differs from the full run's")
        if backward_op is None:
            assert not calls, calls
            continue
        if [c[0] for c in calls] != [backward_op]:
            failures.append(f"{subset}: backward ops called {calls}, expected {backward_op} once")
        elif masked is not None:
            want_mask = [m in subset for m in masked]
            want_mask += [False] * (len(calls[0][1]) - len(want_mask))
            if calls[0][1] != want_mask:
                failures.append(f"{subset}: output_mask {calls[0][1]}, expected {want_mask}")
    assert not failures, f"{len(failures)} of {len(subsets)} subsets:\n" + "\n".join(failures[:20])
