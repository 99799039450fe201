"""Every bad argument of every op, in the real kernels and in the fake kernels, with the same
message.

For each op of torch.ops.hcext (the public ops, their _fwd ops and every backward op), a valid
call (n = 4 streams, C = 8, 3 tokens, fp32) and a table of calls that each break one argument:
wrong shape, wrong dtype, n out of range, non-finite or negative epsilons, iteration counts
out of range, a bad norm name, inconsistent saved tensors and incoming gradients. Each call
must raise a RuntimeError whose message names the argument (helpers.BadCase /
assert_all_rejected):

* on the real kernels (the ``device`` fixture: CPU, and CUDA when present), and
* on the fake kernels (hcext/ops/*.py, what torch.compile and export run), under
  ``torch._subclasses.fake_tensor.FakeTensorMode``,

and the two messages must agree word for word up to the argument's name (the C++ side
prints dtypes as Float where the Python side prints torch.float32, and sometimes adds
detail after it). The valid call itself must pass both, so that every case fails for the
one reason it describes.

The boundary backward ops check every input of layer l's merge (x, the parameters, f,
h_post, h_res, pre_mix) first, in the forward's order and under their own name, before any
work, and name the next layer's incoming gradients grad_h_post_next / grad_h_res_next (three
discrepancies this file found, fixed in csrc/mhc/mhc_driver.h and hcext/ops/mhc.py).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hcext  # noqa: F401
from helpers import BadCase, assert_all_rejected

HC = torch.ops.hcext
N, C, T = 4, 8, 3
D = N * N + 2 * N
MAX_ITERS = 1 << 20
MHC_SCALARS = OrderedDict(sinkhorn_iters=3, norm_eps=1e-6, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0)
BACKWARD_SCALARS = OrderedDict(sinkhorn_iters=3, sinkhorn_eps=1e-6, pre_eps=1e-6, post_mult=2.0)


# ---------------------------------------------------------------------------------------
# Valid calls: {argument name: value} in schema order (built on the CPU, moved to the device)


def _base() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        x=r(T, N, C), f=r(T, C), h_pre=torch.rand(T, N, generator=g), h_post=2 * torch.rand(T, N, generator=g),
        h_res=torch.softmax(r(T, N, N), -1), pre_mix=torch.rand(T, N, generator=g), phi=r(N * C, D) * 0.1,
        alpha=torch.tensor([0.3, 0.2, 0.1]), bias=r(D) * 0.5, logits=r(T, N, N),
        static_alpha=r(N, N + 1), static_beta=r(N), dynamic_alpha=r(C, N + 1) * 0.1, dynamic_beta=r(C) * 0.1,
        alpha_scale=torch.tensor(0.5), beta_scale=torch.tensor(0.7), norm_weight=1 + 0.1 * r(C),
        norm_bias=0.1 * r(C),
    )


HC_PARAMS = ("static_alpha", "static_beta", "dynamic_alpha", "dynamic_beta", "alpha_scale", "beta_scale",
             "norm_weight", "norm_bias")


def _valid_calls() -> Dict[str, "OrderedDict[str, object]"]:
    b = _base()
    x, f, h_post, h_res, pre_mix = b["x"], b["f"], b["h_post"], b["h_res"], b["pre_mix"]
    params = OrderedDict(phi=b["phi"], alpha=b["alpha"], bias=b["bias"])
    g = torch.Generator().manual_seed(1)
    like = lambda t: torch.randn(t.shape, generator=g)  # noqa: E731
    calls = {}
    calls["sinkhorn"] = OrderedDict(logits=b["logits"], iters=3, eps=1e-6)
    calls["sinkhorn_backward"] = OrderedDict(grad=like(b["logits"]), logits=b["logits"], iters=3, eps=1e-6)
    calls["stream_aggregate"] = OrderedDict(x=x, h_pre=b["h_pre"])
    calls["stream_aggregate_backward"] = OrderedDict(grad=like(f), x=x, h_pre=b["h_pre"], output_mask=[True, True])
    calls["stream_mix_expand"] = OrderedDict(f=f, x=x, h_post=h_post, h_res=h_res)
    calls["stream_mix_expand_backward"] = OrderedDict(grad=like(x), f=f, x=x, h_post=h_post, h_res=h_res,
                                                      output_mask=[True] * 4)
    for op in ("mhc_coeffs", "mhc_coeffs_fwd", "mhc_pre", "mhc_pre_fwd"):
        calls[op] = OrderedDict(x=x, **params, **MHC_SCALARS)
    _, _, _, proj, rstd = HC.mhc_coeffs_fwd(x, *params.values(), *MHC_SCALARS.values())
    calls["mhc_backward"] = OrderedDict(
        x=x, **params, proj=proj, rstd=rstd, grad_layer_input=like(f), grad_h_pre=like(h_post),
        grad_h_post=like(h_post), grad_h_res=like(h_res), **BACKWARD_SCALARS)
    for op in ("mhc_post_pre", "mhc_post_pre_fwd"):
        calls[op] = OrderedDict(f=f, x=x, h_post=h_post, h_res=h_res, **params, **MHC_SCALARS)
    x_next, _, _, _, proj, rstd = HC.mhc_post_pre_fwd(f, x, h_post, h_res, *params.values(), *MHC_SCALARS.values())
    calls["mhc_post_pre_backward"] = OrderedDict(
        grad_x_next=like(x), grad_layer_input=like(f), grad_h_post_next=like(h_post), grad_h_res_next=like(h_res),
        f=f, x=x, h_post=h_post, h_res=h_res, x_next=x_next, **params, proj=proj, rstd=rstd, **BACKWARD_SCALARS,
        output_mask=[True] * 4)
    for op in ("mhc_pre_shifted", "mhc_pre_shifted_fwd"):
        calls[op] = OrderedDict(x=x, pre_mix=pre_mix, **params, **MHC_SCALARS)
    *_, proj, rstd = HC.mhc_pre_shifted_fwd(x, pre_mix, *params.values(), *MHC_SCALARS.values())
    calls["mhc_shifted_backward"] = OrderedDict(
        x=x, pre_mix=pre_mix, **params, proj=proj, rstd=rstd, grad_layer_input=like(f),
        grad_next_pre_mix=like(h_post), grad_h_post=like(h_post), grad_h_res=like(h_res), **BACKWARD_SCALARS)
    for op in ("mhc_post_pre_shifted", "mhc_post_pre_shifted_fwd"):
        calls[op] = OrderedDict(f=f, x=x, h_post=h_post, h_res=h_res, pre_mix=pre_mix, **params, **MHC_SCALARS)
    x_next, *_, proj, rstd = HC.mhc_post_pre_shifted_fwd(f, x, h_post, h_res, pre_mix, *params.values(),
                                                          *MHC_SCALARS.values())
    calls["mhc_post_pre_shifted_backward"] = OrderedDict(
        grad_x_next=like(x), grad_layer_input=like(f), grad_h_post_next=like(h_post), grad_h_res_next=like(h_res),
        grad_next_pre_mix=like(h_post), f=f, x=x, h_post=h_post, h_res=h_res, pre_mix=pre_mix, x_next=x_next,
        **params, proj=proj, rstd=rstd, **BACKWARD_SCALARS, output_mask=[True] * 5)
    hc_params = OrderedDict((k, b[k]) for k in HC_PARAMS)
    for op in ("hc_coeffs", "hc_coeffs_fwd"):
        calls[op] = OrderedDict(x=x, **hc_params, norm="layer", norm_eps=1e-5, use_tanh=True)
    *_, proj, stats = HC.hc_coeffs_fwd(x, *hc_params.values(), "layer", 1e-5, True)
    calls["hc_coeffs_backward"] = OrderedDict(
        x=x, **hc_params, proj=proj, stats=stats, grad_h_pre=like(h_post), grad_h_post=like(h_post),
        grad_h_res=like(h_res), norm="layer", use_tanh=True, output_mask=[True] * 9)
    return calls


VALID = _valid_calls()
OPS = list(VALID)


def test_every_op_is_covered():
    """Every op registered in the hcext namespace (public, _fwd and backward) has a valid call
    and bad cases (dir(torch.ops.hcext) lists only the ops looked up so far: ask the dispatcher)."""
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("hcext::")}
    assert names == set(OPS), sorted(names ^ set(OPS))
    assert set(BAD) == set(OPS)


def test_schema_names_match():
    """The valid calls name the arguments as the schemas do (so the cases mutate the right one)."""
    for op, args in VALID.items():
        schema = [a.name for a in getattr(HC, op).default._schema.arguments]
        assert list(args) == schema, (op, list(args), schema)


# ---------------------------------------------------------------------------------------
# Bad cases: (argument, how to break it, regex of the message after "hcext::<op>: ")

Change = Callable[[Dict[str, object]], object]  # the valid arguments -> the bad value


def randn(*shape, dtype=torch.float32) -> Change:
    return lambda a: torch.randn(shape, dtype=dtype)


def cast(name: str, dtype) -> Change:
    return lambda a: a[name].to(dtype)


def integer(name: str) -> Change:
    return lambda a: torch.ones(a[name].shape, dtype=torch.int32)


def value(v) -> Change:
    return lambda a: v


Spec = Tuple[str, str, Change, str]  # (case id, argument, change, regex)


def _x_coeff_cases() -> List[Spec]:
    return [
        ("x-1dim", "x", randn(N * C), r"expected x of shape \[\.\.\., n, C\] with at least 2 dims"),
        ("x-int", "x", integer("x"), r"expected x of dtype float32, bfloat16, float16 or float64"),
        ("x-n=33", "x", randn(T, 33, C), r"expected n = x.size\(-2\) in \[1, 32\], got 33"),
        ("x-n=0", "x", randn(T, 0, C), r"expected n = x.size\(-2\) in \[1, 32\], got 0"),
        ("x-C=0", "x", randn(T, N, 0), r"expected C = x.size\(-1\) >= 1, got 0"),
    ]


def _x_stream_cases() -> List[Spec]:
    return [
        ("x-1dim", "x", randn(N * C), r"expected x of shape \[\.\.\., n, C\] with at least 2 dims, got 1 dim"),
        ("x-int", "x", integer("x"), r"expected x to be a floating-point tensor"),
        ("x-n=33", "x", randn(T, 33, C), r"expected n \(x's dim -2\) in \[1, 32\], got 33"),
        ("x-n=0", "x", randn(T, 0, C), r"expected n \(x's dim -2\) in \[1, 32\], got 0"),
    ]


def _param_cases() -> List[Spec]:
    return [
        ("phi-shape", "phi", randn(N * C, D + 1), r"expected phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]"),
        ("phi-rows", "phi", randn(N * C - 1, D), r"expected phi of shape \[n\*C, n\*n\+2n\] = \[32, 24\]"),
        ("phi-fp64", "phi", cast("phi", torch.float64), r"expected phi of dtype"),
        ("alpha-shape", "alpha", randn(4), r"expected alpha of shape \[3\]"),
        ("alpha-bf16", "alpha", cast("alpha", torch.bfloat16), r"expected alpha of dtype"),
        ("bias-shape", "bias", randn(D - 1), r"expected bias of shape \[n\*n\+2n\] = \[24\]"),
        ("bias-fp64", "bias", cast("bias", torch.float64), r"expected bias of dtype"),
    ]


def _iters_eps_cases(norm_eps: bool) -> List[Spec]:
    cases = [
        ("iters=0", "sinkhorn_iters", value(0), r"expected sinkhorn_iters in \[1, 1048576\], got 0"),
        ("iters=-2", "sinkhorn_iters", value(-2), r"expected sinkhorn_iters in \[1, 1048576\], got -2"),
        ("iters-huge", "sinkhorn_iters", value(MAX_ITERS + 1),
         r"expected sinkhorn_iters in \[1, 1048576\], got 1048577"),
        ("sinkhorn_eps=nan", "sinkhorn_eps", value(math.nan), r"expected sinkhorn_eps finite and >= 0, got nan"),
        ("sinkhorn_eps=inf", "sinkhorn_eps", value(math.inf), r"expected sinkhorn_eps finite and >= 0, got inf"),
        ("sinkhorn_eps<0", "sinkhorn_eps", value(-1e-3), r"expected sinkhorn_eps finite and >= 0, got -0.001"),
        ("pre_eps=nan", "pre_eps", value(math.nan), r"expected pre_eps finite, got nan"),
        ("pre_eps=-inf", "pre_eps", value(-math.inf), r"expected pre_eps finite, got -inf"),
        ("post_mult=inf", "post_mult", value(math.inf), r"expected post_mult finite, got inf"),
        ("post_mult=nan", "post_mult", value(math.nan), r"expected post_mult finite, got nan"),
    ]
    if norm_eps:
        cases += [
            ("norm_eps=nan", "norm_eps", value(math.nan), r"expected norm_eps finite and >= 0, got nan"),
            ("norm_eps=inf", "norm_eps", value(math.inf), r"expected norm_eps finite and >= 0, got inf"),
            ("norm_eps<0", "norm_eps", value(-1.0), r"expected norm_eps finite and >= 0, got -1"),
        ]
    return cases


def _coef_cases(name: str, rank: int) -> List[Spec]:
    """A stream-op coefficient (h_pre / h_post / pre_mix: rank 1, h_res: rank 2): per token or shared."""
    per_token = (T,) + (N,) * rank
    bad = (T,) + (N,) * (rank - 1) + (N + 1,)
    return [
        (f"{name}-shape", name, randn(*bad),
         rf"expected {name} of shape " + re.escape(f"{list(per_token)} (per token")),
        (f"{name}-shared-shape", name, randn(*(N + 1,) * rank), rf"expected {name} of shape"),
        (f"{name}-fp64", name, cast(name, torch.float64), rf"expected {name} to be"),
    ]


def _f_cases() -> List[Spec]:
    return [
        ("f-C", "f", randn(T, C + 1), r"expected f's last dim \(C\) to be 8 like x's"),
        ("f-lead", "f", randn(T + 1, C), r"expected f's leading dims to be \[3\] \(x's leading dims\)"),
        ("f-0dim", "f", randn(), r"expected f's last dim \(C\) to be 8"),
        ("f-fp64", "f", cast("f", torch.float64), r"expected f to have x's dtype"),
    ]


def _saved_cases(stats: bool = False) -> List[Spec]:
    if stats:  # hc_coeffs_backward: proj [..., n, K], stats [..., n, 2]
        return [
            ("proj-K", "proj", randn(T, N, N + 1), r"expected proj of shape \[\.\.\., n, K\] = \[\.\.\., 4, 6\]"),
            ("proj-tokens", "proj", randn(T - 1, N, N + 2), r"expected proj of shape \[\.\.\., n, K\]"),
            ("proj-fp64", "proj", cast("proj", torch.float64), r"expected proj of dtype"),
            ("stats-shape", "stats", randn(T, N, 3), r"expected stats of shape \[\.\.\., n, 2\]"),
            ("stats-fp64", "stats", cast("stats", torch.float64), r"expected stats of dtype"),
        ]
    return [
        ("proj-D", "proj", randn(T, D - 1), r"expected proj of shape \[\.\.\., 24\] with x's leading dims"),
        ("proj-tokens", "proj", randn(T + 1, D), r"expected proj of shape \[\.\.\., 24\] with x's leading dims"),
        ("proj-fp64", "proj", cast("proj", torch.float64), r"expected proj of dtype"),
        ("rstd-tokens", "rstd", randn(T + 1), r"expected rstd with one value per token \(3\)"),
        ("rstd-fp64", "rstd", cast("rstd", torch.float64), r"expected rstd of dtype"),
    ]


def _optional_grad_cases(name: str, per_token: int) -> List[Spec]:
    return [
        (f"{name}-numel", name, randn(T, per_token + 1), rf"expected {name} with {T * per_token} elements"),
        (f"{name}-int", name, integer(name), rf"expected {name} to be floating point"),
    ]


def _boundary_cases() -> List[Spec]:
    return [
        ("x_next-shape", "x_next", randn(T - 1, N, C), r"expected x_next with x's shape \[3, 4, 8\]"),
        ("x_next-fp64", "x_next", cast("x_next", torch.float64), r"expected x_next with x's shape \[3, 4, 8\]"),
        ("grad_x_next-shape", "grad_x_next", randn(T, N, C + 1), r"expected grad_x_next with x's shape \[3, 4, 8\]"),
        ("grad_x_next-fp64", "grad_x_next", cast("grad_x_next", torch.float64),
         r"expected grad_x_next with x's shape \[3, 4, 8\], dtype"),
    ]


def _hc_cases(backward: bool) -> List[Spec]:
    cases = _x_coeff_cases() + [
        ("norm", "norm", value("group"), r'expected norm to be "rms" or "layer", got "group"'),
        ("static_alpha-shape", "static_alpha", randn(N, N), r"expected static_alpha of shape \[n, n\+1\] = \[4, 5\]"),
        ("static_alpha-fp64", "static_alpha", cast("static_alpha", torch.float64), r"expected static_alpha of dtype"),
        ("static_beta-shape", "static_beta", randn(N + 1), r"expected static_beta of shape \[n\] = \[4\]"),
        ("static_beta-fp64", "static_beta", cast("static_beta", torch.float64), r"expected static_beta of dtype"),
        ("dynamic_alpha-shape", "dynamic_alpha", randn(C, N),
         r"expected dynamic_alpha of shape \[C, n\+1\] = \[8, 5\]"),
        ("dynamic_alpha-fp64", "dynamic_alpha", cast("dynamic_alpha", torch.float64),
         r"expected dynamic_alpha of dtype"),
        ("dynamic_beta-shape", "dynamic_beta", randn(C + 1), r"expected dynamic_beta of shape \[C\] = \[8\]"),
        ("dynamic_beta-bf16", "dynamic_beta", cast("dynamic_beta", torch.bfloat16), r"expected dynamic_beta of dtype"),
        ("alpha_scale-1dim", "alpha_scale", randn(1), r"expected alpha_scale of shape \[\] \(0-dim\)"),
        ("alpha_scale-fp64", "alpha_scale", cast("alpha_scale", torch.float64), r"expected alpha_scale of dtype"),
        ("beta_scale-1dim", "beta_scale", randn(2), r"expected beta_scale of shape \[\] \(0-dim\)"),
        ("norm_weight-shape", "norm_weight", randn(C - 1), r"expected norm_weight of shape \[C\] = \[8\]"),
        ("norm_weight-fp64", "norm_weight", cast("norm_weight", torch.float64), r"expected norm_weight of dtype"),
        ("norm_bias-shape", "norm_bias", randn(1, C), r"expected norm_bias of shape \[C\] = \[8\]"),
        ("norm_bias-fp64", "norm_bias", cast("norm_bias", torch.float64), r"expected norm_bias of dtype"),
    ]
    if not backward:
        return cases + [
            ("norm_eps=nan", "norm_eps", value(math.nan), r"expected norm_eps finite and >= 0, got nan"),
            ("norm_eps=inf", "norm_eps", value(math.inf), r"expected norm_eps finite and >= 0, got inf"),
            ("norm_eps<0", "norm_eps", value(-1e-5), r"expected norm_eps finite and >= 0, got -1e-05"),
        ]
    return cases + _saved_cases(stats=True) + [
        ("static-hc", "dynamic_alpha", value(None), None),  # replaced below: both dynamic weights absent
        *_optional_grad_cases("grad_h_pre", N), *_optional_grad_cases("grad_h_post", N),
        *_optional_grad_cases("grad_h_res", N * N),
    ]


def _sinkhorn_cases(backward: bool) -> List[Spec]:
    cases = [
        ("logits-1dim", "logits", randn(N), r"expected logits of shape \[\.\.\., n, n\] with at least 2 dims, got 1"),
        ("logits-square", "logits", randn(T, N, N + 1), r"expected logits' last two dims to be square"),
        ("logits-int", "logits", integer("logits"), r"expected logits to be a floating-point tensor"),
        ("logits-n=33", "logits", randn(1, 33, 33), r"expected n \(logits' last dim\) in \[1, 32\], got 33"),
        ("logits-n=0", "logits", randn(1, 0, 0), r"expected n \(logits' last dim\) in \[1, 32\], got 0"),
        ("iters=0", "iters", value(0), r"expected iters in \[1, 1048576\], got 0"),
        ("iters=-1", "iters", value(-1), r"expected iters in \[1, 1048576\], got -1"),
        ("iters-huge", "iters", value(MAX_ITERS + 1), r"expected iters in \[1, 1048576\], got 1048577"),
        ("eps=nan", "eps", value(math.nan), r"expected eps to be finite and >= 0, got nan"),
        ("eps=-inf", "eps", value(-math.inf), r"expected eps to be finite and >= 0, got -inf"),
        ("eps<0", "eps", value(-1e-6), r"expected eps to be finite and >= 0, got -1e-06"),
    ]
    if backward:
        cases += [
            ("grad-shape", "grad", randn(T, N, N + 1), r"expected grad of shape"),
            ("grad-int", "grad", integer("grad"), r"expected grad to be a floating-point tensor"),
        ]
    return cases


def _specs() -> Dict[str, List[Spec]]:
    mhc_fwd = _x_coeff_cases() + _param_cases() + _iters_eps_cases(norm_eps=True)
    mhc_bwd = _x_coeff_cases() + _param_cases() + _iters_eps_cases(norm_eps=False) + _saved_cases()
    merge = _f_cases() + _coef_cases("h_post", 1) + _coef_cases("h_res", 2)
    specs = {
        "sinkhorn": _sinkhorn_cases(False),
        "sinkhorn_backward": _sinkhorn_cases(True),
        "stream_aggregate": _x_stream_cases() + _coef_cases("h_pre", 1),
        "stream_aggregate_backward": _x_stream_cases() + _coef_cases("h_pre", 1) + [
            ("grad-shape", "grad", randn(T, C + 1), r"expected grad of shape \[3, 8\] \(the output's\)"),
            ("grad-fp64", "grad", cast("grad", torch.float64), r"expected grad to have x's dtype"),
        ],
        "stream_mix_expand": _x_stream_cases() + merge,
        "stream_mix_expand_backward": _x_stream_cases() + merge + [
            ("grad-shape", "grad", randn(T, N, C - 1), r"expected grad of shape \[3, 4, 8\] \(the output's\)"),
            ("grad-bf16", "grad", cast("grad", torch.bfloat16), r"expected grad to have x's dtype"),
        ],
        "mhc_backward": mhc_bwd + _optional_grad_cases("grad_layer_input", C) + _optional_grad_cases("grad_h_pre", N)
        + _optional_grad_cases("grad_h_post", N) + _optional_grad_cases("grad_h_res", N * N),
        "mhc_post_pre_backward": mhc_bwd + merge + _boundary_cases() + _optional_grad_cases("grad_layer_input", C)
        + _optional_grad_cases("grad_h_post_next", N) + _optional_grad_cases("grad_h_res_next", N * N),
        "mhc_shifted_backward": mhc_bwd + _coef_cases("pre_mix", 1) + _optional_grad_cases("grad_layer_input", C)
        + _optional_grad_cases("grad_next_pre_mix", N) + _optional_grad_cases("grad_h_post", N)
        + _optional_grad_cases("grad_h_res", N * N),
        "mhc_post_pre_shifted_backward": mhc_bwd + merge + _coef_cases("pre_mix", 1) + _boundary_cases()
        + _optional_grad_cases("grad_layer_input", C) + _optional_grad_cases("grad_h_post_next", N)
        + _optional_grad_cases("grad_h_res_next", N * N) + _optional_grad_cases("grad_next_pre_mix", N),
        "hc_coeffs_backward": _hc_cases(backward=True),
    }
    for op in ("mhc_coeffs", "mhc_coeffs_fwd", "mhc_pre", "mhc_pre_fwd"):
        specs[op] = mhc_fwd
    for op in ("mhc_post_pre", "mhc_post_pre_fwd"):
        specs[op] = mhc_fwd + merge
    for op in ("mhc_pre_shifted", "mhc_pre_shifted_fwd"):
        specs[op] = mhc_fwd + _coef_cases("pre_mix", 1)
    for op in ("mhc_post_pre_shifted", "mhc_post_pre_shifted_fwd"):
        specs[op] = mhc_fwd + merge + _coef_cases("pre_mix", 1)
    for op in ("hc_coeffs", "hc_coeffs_fwd"):
        specs[op] = _hc_cases(backward=False)
    return specs


# The name the messages start with: the public ops' composites and _fwd ops report the public
# op (mhc_pre / mhc_pre_fwd check their arguments as mhc_coeffs does).
MESSAGE_OP = {"mhc_coeffs_fwd": "mhc_coeffs", "mhc_pre": "mhc_coeffs", "mhc_pre_fwd": "mhc_coeffs",
              "mhc_post_pre_fwd": "mhc_post_pre", "mhc_pre_shifted_fwd": "mhc_pre_shifted",
              "mhc_post_pre_shifted_fwd": "mhc_post_pre_shifted", "hc_coeffs_fwd": "hc_coeffs"}


def _bad_args(op: str, spec: Spec) -> "OrderedDict[str, object]":
    case_id, arg, change, _ = spec
    args = OrderedDict(VALID[op])
    if case_id == "static-hc":  # hc_coeffs_backward without dynamic weights
        args["dynamic_alpha"] = args["dynamic_beta"] = None
        return args
    assert arg in args, (op, arg)
    args[arg] = change(args)
    return args


def _regex(op: str, spec: Spec) -> str:
    case_id, _, _, match = spec
    if case_id == "static-hc":
        match = r"expected dynamic_alpha or dynamic_beta"
    return rf"^hcext::{MESSAGE_OP.get(op, op)}: {match}"


def _to(args, device):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values()]


def _fake_call(op: str, args) -> Callable[[], object]:
    fn = getattr(HC, op).default

    def call():
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args.values()]
            return fn(*fake)

    return call


BAD = _specs()


def _specs_of(op: str) -> List[Spec]:
    return list(BAD[op])


def _cases(op: str, fake: bool, device="cpu", specs=None) -> List[BadCase]:
    fn = getattr(HC, op).default
    cases = []
    for spec in _specs_of(op) if specs is None else specs:
        args = _bad_args(op, spec)
        call = _fake_call(op, args) if fake else (lambda a=args: fn(*_to(a, device)))
        cases.append(BadCase(spec[0], lambda d, c=call: c, _regex(op, spec)))
    return cases


def _argument_named(op: str, spec: Spec) -> str:
    return "dynamic_alpha" if spec[0] == "static-hc" else spec[1]


def test_case_ids_unique_and_name_their_argument():
    for op, specs in BAD.items():
        ids = [s[0] for s in specs]
        assert len(ids) == len(set(ids)), (op, ids)
        for spec in specs:
            assert _argument_named(op, spec) in _regex(op, spec), (op, spec[0])
    assert sum(len(s) for s in BAD.values()) > 500


@pytest.mark.parametrize("op", OPS)
def test_valid_call_passes(device, op):
    """The unbroken call runs, on the kernels and on the fake kernels."""
    fn = getattr(HC, op).default
    fn(*_to(VALID[op], device))
    _fake_call(op, VALID[op])()


@pytest.mark.parametrize("op", OPS)
def test_bad_arguments_rejected_by_kernels(device, op):
    assert_all_rejected(None, _cases(op, fake=False, device=device), device)


def _messages_differ(op: str, specs: List[Spec]) -> List[str]:
    """The cases whose kernel (CPU) and fake-kernel messages differ before the argument's name."""
    fn = getattr(HC, op).default
    different = []
    for spec in specs:
        args = _bad_args(op, spec)
        messages = []
        for call in (lambda: fn(*_to(args, "cpu")), _fake_call(op, args)):
            with pytest.raises(RuntimeError) as info:
                call()
            messages.append(str(info.value))
        name = _argument_named(op, spec)
        heads = []
        for m in messages:
            at = re.search(rf"\b{re.escape(name)}\b", m)
            heads.append(m[: at.end()] if at else m)
        if heads[0] != heads[1]:
            different.append(f"{spec[0]}: kernel {messages[0][:160]!r} vs fake {messages[1][:160]!r}")
    return different


@pytest.mark.parametrize("op", OPS)
def test_bad_arguments_rejected_by_fake_kernels_with_the_same_message(op):
    """The fake kernel rejects every case with a message that matches the kernel's word for
    word up to the argument's name."""
    assert_all_rejected(None, _cases(op, fake=True), "cpu")
    different = _messages_differ(op, _specs_of(op))
    assert not different, "\n".join(different)
