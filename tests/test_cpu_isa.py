"""The CPU kernels are compiled for baseline x86-64, AVX2 and AVX-512 and pick one at run time
(csrc/common/cpu_isa.h). HCEXT_CPU_ISA asks for a lower one, read on every call:

* ``baseline`` or ``avx2``: that ISA, clamped to the best this CPU supports;
* unset, or any other value (``avx512`` included: it is not one of the values read): the best
  this CPU supports, i.e. AVX-512 (avx512f/vl/bw/dq) when present, else AVX2 (avx2 + fma),
  else baseline.

Every variant must give the same results: bit-identical for Sinkhorn (compiled without FMA
contraction), within the fp32 row of the tolerance table for the stream, mHC and HC row passes
(FMA contraction where the ISA has it). Each variant is a test of its own, named by the ISA it
runs (from /proc/cpuinfo's flags and the rules above); a variant this CPU cannot run is
skipped, saying which flags it lacks (pytest -rs).
"""

import os
from typing import Optional, Set

import pytest
import torch

from hcext import ops
from helpers import assert_close_dtype, assert_scaled_close

ORDER = ["baseline", "avx2", "avx512"]
FLAGS_NEEDED = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512vl", "avx512bw", "avx512dq")}
# What to set HCEXT_CPU_ISA to for each variant (None: unset, the best).
REQUEST = {"baseline": "baseline", "avx2": "avx2", "avx512": None}


def cpu_flags() -> Optional[Set[str]]:
    """The CPU's feature flags from /proc/cpuinfo (None where there is no such file: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def best_isa(flags: Optional[Set[str]]) -> str:
    """What csrc/common/cpu_isa.h's best_supported_isa() picks on a CPU with these flags."""
    if flags is None:
        return "baseline"
    for isa in ("avx512", "avx2"):
        if all(f in flags for f in FLAGS_NEEDED[isa]):
            return isa
    return "baseline"


def isa_for_request(request: Optional[str], flags: Optional[Set[str]]) -> str:
    """The variant that runs for HCEXT_CPU_ISA=request (None: unset), as cpu_isa() decides it."""
    best = best_isa(flags)
    want = request if request in ("baseline", "avx2") else best  # unset or unknown: the best
    return min(want, best, key=ORDER.index)


FLAGS = cpu_flags()
BEST = best_isa(FLAGS)
X86 = FLAGS is not None and "sse2" in FLAGS


def test_request_rules():
    """The rules above, on made-up CPUs (what the variant tests rely on)."""
    avx512 = {"avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq"}
    assert isa_for_request(None, avx512) == "avx512"
    assert isa_for_request("avx512", avx512) == "avx512"  # not read: the best
    assert isa_for_request("AVX2", avx512) == "avx512"  # case matters: not read
    assert isa_for_request("avx2", avx512) == "avx2"
    assert isa_for_request("baseline", avx512) == "baseline"
    assert isa_for_request("avx2", {"avx2"}) == "baseline"  # AVX2 without FMA: not the AVX2 variant
    assert isa_for_request(None, {"avx2", "fma", "avx512f"}) == "avx2"  # AVX-512F alone is not enough
    assert isa_for_request("avx2", set()) == "baseline"


def _set_isa(monkeypatch, isa: str):
    request = REQUEST[isa]
    if request is None:
        monkeypatch.delenv("HCEXT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("HCEXT_CPU_ISA", request)


def _skip_unless_supported(isa: str):
    if not X86:
        pytest.skip("not an x86-64 Linux CPU (no /proc/cpuinfo flags): one variant only")
    runs = isa_for_request(REQUEST[isa], FLAGS)
    if runs != isa:
        missing = [f for f in FLAGS_NEEDED[isa] if f not in FLAGS]
        pytest.skip(f"this CPU lacks {', '.join(missing)}: HCEXT_CPU_ISA={REQUEST[isa] or '(unset)'} runs the "
                    f"{runs} variant, not {isa}")


def _run_all(seed, dtype, C):
    """Every CPU kernel family forward and backward: Sinkhorn, mhc_pre, stream_mix_expand,
    mhc_post_pre, and dynamic HC (hc_coeffs with every optional parameter, LayerNorm and RMSNorm;
    then stream_aggregate). Returns (outputs, gradients of every input)."""
    g = torch.Generator().manual_seed(seed)
    n, T = 4, 7
    x = torch.randn(T, n, C, generator=g).to(dtype).requires_grad_(True)
    f = torch.randn(T, C, generator=g).to(dtype).requires_grad_(True)
    logits = torch.randn(T, n, n, generator=g).requires_grad_(True)
    phi = (torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5).requires_grad_(True)
    alpha = torch.full((3,), 0.5, requires_grad=True)
    bias = (torch.randn(n * n + 2 * n, generator=g) * 0.5).requires_grad_(True)
    hc = dict(static_alpha=torch.randn(n, n + 1, generator=g), static_beta=torch.randn(n, generator=g),
              dynamic_alpha=torch.randn(C, n + 1, generator=g) * 0.3, dynamic_beta=torch.randn(C, generator=g) * 0.3,
              alpha_scale=torch.tensor(0.5), beta_scale=torch.tensor(0.7),
              norm_weight=1 + 0.2 * torch.randn(C, generator=g), norm_bias=0.2 * torch.randn(C, generator=g))
    hc = {k: v.requires_grad_(True) for k, v in hc.items()}
    h_res = ops.sinkhorn(logits, 20)
    y, h_post_next, h_res_next = ops.mhc_pre(x, phi, alpha, bias)
    h_post = torch.sigmoid(logits[..., 0]) * 2
    out = ops.stream_mix_expand(f, x, h_post, h_res)
    fused = ops.mhc_post_pre(f, x, h_post, h_res, phi, alpha, bias)
    hc_layer = ops.hc_coeffs(x, **hc, norm="layer", norm_eps=1e-5)
    hc_rms = ops.hc_coeffs(x, *list(hc.values())[:7], norm="rms", use_tanh=False)
    hc_y = ops.stream_aggregate(x, hc_layer[0])
    outs = [h_res, y, h_post_next, h_res_next, out, *fused, *hc_layer, *hc_rms, hc_y]
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x, f, logits, phi, alpha, bias, *hc.values()])
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("C", [64, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_isa_variant_agrees_with_baseline(monkeypatch, record_property, isa, dtype, C):
    _skip_unless_supported(isa)
    record_property("cpu_isa", isa)
    _set_isa(monkeypatch, "baseline")
    base_outs, base_grads = _run_all(0, dtype, C)
    _set_isa(monkeypatch, isa)
    outs, grads = _run_all(0, dtype, C)
    # Sinkhorn: bit-identical on every ISA.
    assert torch.equal(outs[0], base_outs[0]), isa
    # The others: the tolerance table's row of each tensor's dtype (gradients: the atol scaled
    # by the gradient's largest value).
    for k, (o, ref) in enumerate(zip(outs, base_outs)):
        assert_close_dtype(o, ref, msg=lambda m: f"{isa}, output {k}: {m}")
    for k, (gr, ref) in enumerate(zip(grads, base_grads)):
        assert_scaled_close(gr, ref, name=f"{isa}, gradient {k}")
    # The request reaches the kernels: the FMA variants round differently from the baseline
    # somewhere (if every result were bit-identical, HCEXT_CPU_ISA would not be read).
    assert any(not torch.equal(a, b) for a, b in zip(outs + grads, base_outs + base_grads)), (
        f"{isa}: every result bit-identical to the baseline's: is HCEXT_CPU_ISA read?")


def test_variant_in_use(monkeypatch, record_property):
    """Reports the variant an unset HCEXT_CPU_ISA runs on this CPU, and checks that it is the
    one the unset request is compared as above (the best the CPU supports)."""
    if not X86:
        pytest.skip("not an x86-64 Linux CPU (no /proc/cpuinfo flags)")
    record_property("cpu_isa_default", BEST)
    print(f"hcext CPU kernels: the {BEST} variant runs by default on this CPU "
          f"(HCEXT_CPU_ISA={os.environ.get('HCEXT_CPU_ISA', '(unset)')} in the environment)")
    assert isa_for_request(None, FLAGS) == BEST
    monkeypatch.delenv("HCEXT_CPU_ISA", raising=False)
    default = _run_all(2, torch.float32, 16)
    _set_isa(monkeypatch, BEST)
    requested = _run_all(2, torch.float32, 16)
    for a, b in zip(default[0] + default[1], requested[0] + requested[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", ["avx512", "not-an-isa", "AVX2", ""])
def test_unread_isa_request_runs_the_best(monkeypatch, value):
    """A value cpu_isa.h does not read (avx512 among them) runs the same variant as no value."""
    monkeypatch.delenv("HCEXT_CPU_ISA", raising=False)
    expected = _run_all(1, torch.float32, 16)
    monkeypatch.setenv("HCEXT_CPU_ISA", value)
    got = _run_all(1, torch.float32, 16)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        assert torch.equal(a, b)
