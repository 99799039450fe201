"""Helpers shared by the hcext test files: the one tolerance table, the comparisons built on it,
the device markers, and the test scaffold every op family runs through. Imported as
``helpers`` (pytest puts tests/ on sys.path because the folder has no __init__.py).

The scaffold (modelled on torchvision's RoIOpTester and TileKernels' ``_tester``): a family's
test file (tests/test_<family>.py) describes *samples* (which tensors, shapes, dtypes and
layouts, which scalars) and names its op and its reference (hcext/reference.py); the runners
here do the rest, the same way for the op and for the reference:

* ``LAYOUTS`` / ``layout(values, kind)``: one table of memory layouts (contiguous, sliced,
  transposed, lead-permuted, stride-0 expanded, misaligned). A layout gives an ``Input``: a
  leaf ``base`` and the view of it the op receives, so that gradients of a non-contiguous
  input are compared on the leaf.
* ``Sample`` / ``sample(...)``: the arguments of one call (tensors, ``Input`` s, scalars,
  keyword arguments).
* ``forward_backward(fn, sample)``: the forward, and the backward of
  ``sum_k sum(w_k * out_k)`` with the weights ``w_k`` drawn from a fixed seed (the same for
  every function run on the sample): outputs and the gradient of every input.
* ``check_parity(op, reference, sample)``: both through ``forward_backward``, every output and
  every gradient compared with ``assert_scaled_close`` (TOLERANCES), or for bf16 / fp16 samples
  with ``assert_within_twice_reference_error`` (the "twice the reference's error" rule).
* ``run_opcheck(op, args, kwargs, requires_grad)``: torch.library.opcheck of one sample.
* ``BadCase`` / ``assert_rejects`` / ``assert_all_rejected``: bad inputs raise a RuntimeError
  whose message matches.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import pytest
import torch

import hcext

# ---------------------------------------------------------------------------------------
# Tolerances

# The one tolerance table of the suite, keyed by the dtype of the tensors compared.
# fp32: kernels and references differ by op order and exp implementation only (a few
#   ulp amplified by up to 2 * iters normalisation steps and the backward's recompute).
# fp64: the same, for gradcheck-grade inputs.
# bf16 / fp16: one rounding of values that are equal in fp32 (one ulp: 2^-8, 2^-11),
#   plus headroom.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}

LOW_PRECISION = (torch.bfloat16, torch.float16)


def assert_close_dtype(actual, expected, dtype=None, msg=None):
    """assert_close with the table's tolerance for ``dtype`` (default: expected's dtype).

    Also checks dtype, device and shape equality (assert_close does).
    """
    dtype = expected.dtype if dtype is None else dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=msg)


def _scale_of(expected: torch.Tensor, scale) -> Union[float, torch.Tensor]:
    """The atol multiplier: 1 (``scale=None``: plain assert_close semantics), max(1, max|expected|)
    (``scale="max"``), or a given number / tensor broadcastable to expected."""
    if scale is None:
        return 1.0
    if isinstance(scale, str):
        assert scale == "max", scale
        return max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return scale


def assert_scaled_close(actual, expected, dtype=None, name="", scale="max"):
    """|actual - expected| <= atol * scale + rtol * |expected|, element-wise, with the
    TOLERANCES row of ``dtype`` (default: actual's dtype), compared in fp64.

    scale: "max" (default): max(1, max|expected|): gradients are sums with cancellation (norm
    backwards, sums over tokens and channels), so their rounding error follows their largest
    terms, not each element. None: 1 (torch.testing.assert_close's rule). A number or a tensor
    broadcastable to expected: the magnitude the error follows (for instance, per token, the
    largest of the terms that cancel in a gradient).
    Also checks shape and device.
    """
    dtype = actual.dtype if dtype is None else dtype
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{name}: device {actual.device} vs {expected.device}"
    if actual.numel() == 0:
        return
    s = _scale_of(expected, scale)
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs()
    bound = tol["atol"] * (s.double().to(e.device) if isinstance(s, torch.Tensor) else s) + tol["rtol"] * e.abs()
    bad = ~(err <= bound)  # NaN counts as a mismatch
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, err - bound, torch.zeros_like(err)).nan_to_num(float("inf"))))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements off ({dtype} tolerances, atol x scale); worst "
            f"at flat index {worst}: {a.flatten()[worst].item():.6e} vs {e.flatten()[worst].item():.6e}, error "
            f"{err.flatten()[worst].item():.3e} > bound {bound.flatten()[worst].item():.3e}; "
            f"max error {err.nan_to_num(float('inf')).max().item():.3e}"
        )


def assert_within_twice_reference_error(actual, ref64, ref_lowp, name="", scale="max"):
    """The low-precision rule: the op's largest error against the fp64 reference is at most
    twice the largest error of the reference run on the same low-precision inputs, plus the
    fp32 row's atol times ``scale`` (see assert_scaled_close; a tensor counts by its max).

    Why: with bf16 / fp16 inputs and outputs, the op and the reference round in different
    places, so neither is "the" answer; the op must be no less accurate than the spec run in
    that precision (up to a factor 2), and where both compute in fp32 on the same rounded
    values the fp32 row bounds what is left.
    """
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    s = _scale_of(ref64, scale)
    s = s.max().item() if isinstance(s, torch.Tensor) else s
    ref64 = ref64.detach().double()
    err = (actual.detach().double() - ref64).abs().max().item()
    ref_err = (ref_lowp.detach().double().to(ref64.device) - ref64).abs().max().item()
    slack = TOLERANCES[torch.float32]["atol"] * s
    assert err <= 2 * ref_err + slack, (
        f"{name}: error {err:.3e} vs the low-precision reference's {ref_err:.3e} (allowed 2x + {slack:.1e})"
    )


# ---------------------------------------------------------------------------------------
# Devices


def cuda_usable() -> bool:
    """A CUDA device and hcext built with its CUDA kernels."""
    return torch.cuda.is_available() and hcext.has_cuda()


# For tests that need a GPU by construction (CUDA vs CPU comparisons). Under
# HCEXT_REQUIRE_CUDA=1 a skip with this reason is a failure (conftest.py).
CUDA_SKIP_REASON = "needs a CUDA device and hcext's CUDA kernels"
requires_cuda = pytest.mark.skipif(not cuda_usable(), reason=CUDA_SKIP_REASON)


# ---------------------------------------------------------------------------------------
# Layouts


def _identity(t):
    return t


@dataclasses.dataclass
class Input:
    """One tensor argument: a leaf ``base`` and ``view``, the function of it that the op
    receives. Gradients are taken with respect to ``base``."""

    base: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor] = _identity
    requires_grad: bool = True

    def tensor(self) -> torch.Tensor:
        return self.view(self.base)

    def map_base(self, fn) -> "Input":
        return dataclasses.replace(self, base=fn(self.base))


def _sliced(values):
    wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype, device=values.device)
    wide[..., ::2] = values
    return Input(wide, lambda t: t[..., ::2])


def _transposed(values):
    return Input(values.transpose(-1, -2).contiguous(), lambda t: t.transpose(-1, -2))


def _lead_permuted(values):
    return Input(values.transpose(0, 1).contiguous(), lambda t: t.transpose(0, 1))


def _expanded(values):
    shape = values.shape
    return Input(values[:1].clone(), lambda t: t.expand(shape))


def _offset(values):
    shape = values.shape
    buf = torch.zeros(values.numel() + 1, dtype=values.dtype, device=values.device)
    buf[1:] = values.flatten()
    return Input(buf, lambda t: t[1:].view(shape))


# kind -> (what the op sees, how values become an Input with that layout)
LAYOUTS: Dict[str, Tuple[str, Callable[[torch.Tensor], Input]]] = {
    "contiguous": ("the values as they are", lambda v: Input(v.clone())),
    "sliced": ("every other element of a last dim twice as wide: inner stride 2", _sliced),
    "transposed": ("the last two dims swapped in memory (column-major matrices, [..., C, n] seen as [..., n, C])",
                   _transposed),
    "lead-permuted": ("the first two dims swapped in memory (tokens not outermost)", _lead_permuted),
    "expanded": ("the first entry of dim 0 broadcast along it: stride 0 (values replaced by the first)", _expanded),
    "offset": ("contiguous, but one element into its storage: misaligned (buf[1:].view(...))", _offset),
}
NONCONTIGUOUS = ("sliced", "transposed", "lead-permuted", "expanded")


def layout(values: torch.Tensor, kind: str = "contiguous", requires_grad: bool = True) -> Input:
    """An Input whose view has the layout ``kind`` of LAYOUTS and (except for "expanded", which
    repeats the first entry of dim 0) the given values. Kinds that need more dims than values
    has ("transposed" and "lead-permuted": 2, "expanded": 1, non-empty) are an error."""
    need = {"transposed": 2, "lead-permuted": 2, "expanded": 1}.get(kind, 0)
    if values.dim() < need or (kind == "expanded" and values.shape[0] == 0):
        raise ValueError(f"layout {kind!r} needs a tensor of at least {need} non-empty dims, got {tuple(values.shape)}")
    inp = LAYOUTS[kind][1](values.detach())
    inp.requires_grad = requires_grad
    view = inp.tensor()
    assert view.shape == values.shape, kind
    if kind != "expanded":
        assert torch.equal(view, values), kind
    return inp


def layout_cases(leads: Mapping[str, tuple], kinds: Sequence[str], lead: tuple) -> Dict[str, Tuple[tuple, str]]:
    """{id: (leading shape, layout kind)}: every leading shape of ``leads`` contiguous, then
    every layout of ``kinds`` at the leading shape ``lead``. For parametrize."""
    cases = {name: (tuple(shape), "contiguous") for name, shape in leads.items()}
    cases.update({kind: (tuple(lead), kind) for kind in kinds})
    return cases


# ---------------------------------------------------------------------------------------
# Samples and the forward / backward runner


Arg = Union[torch.Tensor, Input, object]


@dataclasses.dataclass
class Sample:
    """The arguments of one call: positional ``args`` and keyword ``kwargs``, each a tensor,
    an Input or anything else (scalars, strings, None). Floating tensors and Inputs are the
    differentiable inputs (unless an Input says requires_grad=False); ``names`` names the
    positional ones in messages and in Result.grads (default arg0, arg1, ...; keyword inputs
    go by their keyword)."""

    args: Sequence[Arg] = ()
    kwargs: Mapping[str, Arg] = dataclasses.field(default_factory=dict)
    names: Optional[Sequence[str]] = None

    def _map(self, fn) -> "Sample":
        def m(a):
            if isinstance(a, Input):
                return a.map_base(fn)
            return fn(a) if isinstance(a, torch.Tensor) else a

        return Sample([m(a) for a in self.args], {k: m(v) for k, v in self.kwargs.items()}, self.names)

    def cast(self, dtype: torch.dtype) -> "Sample":
        """Every floating-point tensor in ``dtype`` (for the fp64 reference)."""
        return self._map(lambda t: t.detach().to(dtype) if t.is_floating_point() else t)

    def to(self, device) -> "Sample":
        return self._map(lambda t: t.detach().to(device))

    def tensors(self) -> List[torch.Tensor]:
        """The tensors as the op sees them (views applied)."""
        out = []
        for a in [*self.args, *self.kwargs.values()]:
            if isinstance(a, Input):
                out.append(a.tensor())
            elif isinstance(a, torch.Tensor):
                out.append(a)
        return out

    @property
    def low_precision(self) -> bool:
        return any(t.dtype in LOW_PRECISION for t in self.tensors())

    def name(self, i: int) -> str:
        return self.names[i] if self.names is not None and i < len(self.names) else f"arg{i}"


def sample(*args, names=None, **kwargs) -> Sample:
    return Sample(list(args), dict(kwargs), names)


@dataclasses.dataclass
class Result:
    """What forward_backward gives: the outputs, {input name: gradient of its leaf} (zeros for
    inputs the outputs do not depend on) and the output weights of the loss."""

    outs: List[torch.Tensor]
    grads: Dict[str, torch.Tensor]
    weights: List[Optional[torch.Tensor]]

    def to(self, device) -> "Result":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Result([move(o) for o in self.outs], {k: move(g) for k, g in self.grads.items()},
                      [move(w) for w in self.weights])


def output_weights(outs: Sequence[torch.Tensor], seed: int = 0) -> List[Optional[torch.Tensor]]:
    """The loss weights: w_k ~ N(0, 1) of out_k's shape, drawn in fp32 from ``seed`` on the CPU
    (the same values whatever the device and the outputs' dtype), then in out_k's dtype and
    device. None for outputs that are not floating-point."""
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for o in outs:
        if not o.is_floating_point():
            weights.append(None)
            continue
        w = torch.randn(o.shape, generator=gen, dtype=torch.float32)
        weights.append(w.to(device=o.device, dtype=o.dtype))
    return weights


def forward_backward(fn: Callable, s: Sample, *, backward: bool = True, seed: int = 0) -> Result:
    """Calls fn on fresh leaves of the sample's inputs (detached: a leaf keeps its base's
    strides), then, when ``backward``, takes the gradients of every input of
    ``sum_k sum(w_k * out_k)`` (w_k: output_weights(outs, seed)): the incoming gradient of
    out_k is w_k, in out_k's dtype."""
    leaves: Dict[str, torch.Tensor] = {}

    def leaf(name, a):
        if isinstance(a, Input):
            t = a.base.detach().requires_grad_(backward and a.requires_grad and a.base.is_floating_point())
            if t.requires_grad:
                leaves[name] = t
            return a.view(t)
        if isinstance(a, torch.Tensor):
            t = a.detach().requires_grad_(backward and a.is_floating_point())
            if t.requires_grad:
                leaves[name] = t
            return t
        return a

    args = [leaf(s.name(i), a) for i, a in enumerate(s.args)]
    kwargs = {k: leaf(k, v) for k, v in s.kwargs.items()}
    with torch.set_grad_enabled(backward):
        outs = fn(*args, **kwargs)
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    weights = output_weights(outs, seed)
    grads = {}
    if backward and leaves:
        pairs = [(o, w) for o, w in zip(outs, weights) if w is not None and o.requires_grad]
        if pairs:
            values = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), [w for _, w in pairs],
                                         allow_unused=True, materialize_grads=True)
        else:
            values = [torch.zeros_like(t) for t in leaves.values()]
        grads = {name: g.detach() for name, g in zip(leaves, values)}
    return Result([o.detach() for o in outs], grads, weights)


def compare_results(
    got: Result,
    want: Result,
    lowp: Optional[Result] = None,
    *,
    scale="max",
    scales: Optional[Mapping[str, object]] = None,
    out_names: Optional[Sequence[str]] = None,
):
    """Every output and every gradient of ``got`` against ``want`` (the same names, shapes; got's
    device): assert_scaled_close with the TOLERANCES row of got's tensor, or, when ``lowp`` (the
    reference run in low precision) is given, assert_within_twice_reference_error.
    ``scale``: as in assert_scaled_close; ``scales[name]`` overrides it for one output (``out_names``,
    default out0, out1, ...) or gradient (``grad_<input>``): a number, a tensor, or a function of
    ``want`` giving one."""
    out_names = list(out_names) if out_names is not None else [f"out{k}" for k in range(len(want.outs))]
    assert len(got.outs) == len(want.outs) == len(out_names), (len(got.outs), len(want.outs), out_names)
    assert list(got.grads) == list(want.grads), (list(got.grads), list(want.grads))
    items = [(name, got.outs[k], want.outs[k], lowp.outs[k] if lowp else None) for k, name in enumerate(out_names)]
    items += [(f"grad_{name}", got.grads[name], want.grads[name], lowp.grads[name] if lowp else None)
              for name in want.grads]
    scales = scales or {}
    for name, a, w, lw in items:
        sc = scales.get(name, scale)
        if callable(sc):
            sc = sc(want)
        w = w.to(a.device)
        if lowp is not None:
            assert_within_twice_reference_error(a, w, lw, name=name, scale=sc)
        else:
            assert_scaled_close(a, w, a.dtype, name=name, scale=sc)


def check_parity(
    op: Callable,
    reference: Callable,
    s: Sample,
    *,
    reference_dtype: Optional[torch.dtype] = torch.float64,
    twice: Optional[bool] = None,
    backward: bool = True,
    got: Optional[Result] = None,
    **compare,
) -> Tuple[Result, Result]:
    """The op against the reference on one sample: both through forward_backward (the same
    inputs, the same loss weights), then compare_results (``compare``: its keyword arguments).

    reference_dtype: the reference runs on the sample cast to it (default fp64); None: on the
    sample as it is (for instance an unfused composition of ops in the op's own dtype).
    bf16 / fp16 samples (any such input), or ``twice=True``: the twice-the-reference's-error
    rule, against the reference run on the sample as it is.
    ``got``: the op's Result when already computed. Returns (the op's Result, the reference's).
    """
    got = got if got is not None else forward_backward(op, s, backward=backward)
    want = forward_backward(reference, s if reference_dtype is None else s.cast(reference_dtype), backward=backward)
    twice = s.low_precision if twice is None else twice
    lowp = forward_backward(reference, s, backward=backward) if twice else None
    compare_results(got, want, lowp, **compare)
    return got, want


# ---------------------------------------------------------------------------------------
# opcheck


def run_opcheck(op, args: Sequence, kwargs: Optional[Mapping] = None, requires_grad: Union[bool, Iterable] = False):
    """torch.library.opcheck(op, args, kwargs) (schema, autograd registration, fake tensor,
    AOT dispatch with dynamic shapes) with ``requires_grad``: False, True (every floating tensor
    argument), or the positions / keyword names of the arguments that require grad.
    A detached alias keeps each argument's strides."""
    kwargs = dict(kwargs or {})
    if requires_grad is True:
        wanted = set(range(len(args))) | set(kwargs)
    else:
        wanted = set(requires_grad or ())

    def prep(key, a):
        if isinstance(a, torch.Tensor):
            return a.detach().requires_grad_(key in wanted and a.is_floating_point())
        return a

    args = tuple(prep(i, a) for i, a in enumerate(args))
    kwargs = {k: prep(k, v) for k, v in kwargs.items()}
    torch.library.opcheck(op, args, kwargs)


# ---------------------------------------------------------------------------------------
# Bad inputs


@dataclasses.dataclass(frozen=True)
class BadCase:
    """A call that must fail: ``make(device)`` gives the call as a Sample (or ``(fn, Sample)``
    to name the function too), ``match`` the regex its RuntimeError's message must match."""

    id: str
    make: Callable[[str], object]
    match: str


def _call_of(case: BadCase, fn, device):
    made = case.make(device)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], Sample):
        fn, made = made
    if isinstance(made, Sample):
        return lambda: fn(*made.args, **made.kwargs)
    assert callable(made), made
    return made


def assert_rejects(fn: Optional[Callable], case: BadCase, device, prefix: str = ""):
    """fn(*sample) for the case's call on ``device`` raises a RuntimeError whose message
    matches ``prefix + case.match``. fn may be None when the case names its function."""
    call = _call_of(case, fn, device)
    with pytest.raises(RuntimeError, match=prefix + case.match):
        call()


def assert_all_rejected(fn: Optional[Callable], cases: Iterable[BadCase], device, prefix: str = ""):
    """assert_rejects for every case, reporting every case that fails at once."""
    failures = []
    for case in cases:
        call = _call_of(case, fn, device)
        try:
            call()
        except RuntimeError as e:
            if not re.search(prefix + case.match, str(e)):
                failures.append(f"{case.id}: message {str(e)[:300]!r} does not match {prefix + case.match!r}")
        else:
            failures.append(f"{case.id}: no error")
    assert not failures, "\n".join(failures)


def run_rank_and_exit(init, body, teardown):
    """The shape of every spawned distributed rank in the tests: ``init()``, ``body()``,
    then ``teardown()`` (``destroy_process_group``) and an immediate ``os._exit(0)``.

    Why the exit: a gloo process group whose last reference dies during interpreter
    finalisation (a DDP / FSDP2 module, a pending work object) has its worker threads
    release tensors that need the GIL; CPython makes such threads ``pthread_exit`` during
    finalisation, the forced unwind crosses a ``noexcept`` C++ frame and the rank dies of
    SIGABRT ("terminate called without an active exception") — seen twice in CI runs of
    the whole suite on 2 cores (never in 40 runs of the test alone). ``body`` runs in its own frame,
    so its models are released (and collected) before the group is destroyed, and the
    process ends without finalisation. An exception in ``body`` still propagates (the
    spawn wrapper records its traceback and the parent fails the test)."""
    import gc

    init()
    try:
        body()
        gc.collect()
    finally:
        teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
