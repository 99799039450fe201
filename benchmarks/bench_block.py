"""End-to-end cost of mHC in one transformer block (issue 7's overhead figure).

One pre-norm block (causal self-attention + MLP sub-layers), forward + backward, three ways
on the same weights and input:

* ``residual``  — plain ``h = h + F(norm(h))`` per sub-layer (the baseline);
* ``hcext_mhc`` — each sub-layer wrapped in ``hcext.nn.HyperConnection(kind="mhc")``, n streams;
* ``ref_mhc``   — the same mHC block on the pure-PyTorch reference (``hcext.reference``).

The overhead of mHC is ``time(mhc) / time(residual) - 1`` (the mHC paper reports 6.7% at n=4
on its GPU cluster, with its fused kernels and recompute). Parameters of the hcext and
reference blocks are shared, so both compute the same numbers: before timing, the hcext block's
output and gradients (input and every parameter) are asserted to match the reference block run
in float64, by the test suite's tolerance table (bench_mhc.check_against_reference; the JSON's
``check`` records the largest error as a fraction of the allowed one).

    python -m benchmarks.bench_block [--device cuda] [--quick] [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

if __package__ in (None, ""):  # python benchmarks/bench_block.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hcext  # noqa: E402
from hcext import reference as ref  # noqa: E402
from hcext.nn import HyperConnection, expand_streams  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.bench_mhc import check_against_reference  # noqa: E402


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm, self.heads = nn.RMSNorm(dim), heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, h):
        B, S, C = h.shape
        q, k, v = self.qkv(self.norm(h)).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, C))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, h):
        return self.down(nn.functional.gelu(self.up(self.norm(h))))


class Block(nn.Module):
    """Residual block, or an mHC block when ``streams`` is given (``use_reference`` runs
    the mHC sub-layer update on hcext.reference instead of hcext's ops)."""

    def __init__(self, dim: int, heads: int, streams: int = 0, use_reference: bool = False):
        super().__init__()
        self.branches = nn.ModuleList([Attention(dim, heads), MLP(dim)])
        self.use_reference = use_reference
        self.hcs = nn.ModuleList(
            [HyperConnection(dim, streams, kind="mhc", layer_index=i) for i in range(2)] if streams else []
        )

    def forward(self, h):
        if not self.hcs:
            for branch in self.branches:
                h = h + branch(h)
            return h
        for hc, branch in zip(self.hcs, self.branches):
            if self.use_reference:
                y, h_post, h_res = ref.mhc_pre(h, hc.phi, hc.alpha, hc.bias)
                h = ref.stream_mix_expand(branch(y), h, h_post, h_res)
            else:
                y, add = hc(h)
                h = add(branch(y))
        return h


def run(device: str, dtype: torch.dtype, tokens: int, dim: int, heads: int, streams: int, repeats: int, seq: int):
    torch.manual_seed(0)
    blocks = {
        "residual": Block(dim, heads),
        "hcext_mhc": Block(dim, heads, streams),
        "ref_mhc": Block(dim, heads, streams, use_reference=True),
    }
    blocks["ref_mhc"].load_state_dict(blocks["hcext_mhc"].state_dict())
    with torch.no_grad():  # away from init: coefficients that actually mix
        for hc in blocks["hcext_mhc"].hcs:
            hc.phi.normal_(0, 0.02)
        blocks["ref_mhc"].load_state_dict(blocks["hcext_mhc"].state_dict())
    for b in blocks.values():
        b.to(device=device, dtype=dtype)
        for hc in b.hcs:
            hc.float()  # coefficient parameters stay fp32
    batch = max(1, tokens // seq)
    h = torch.randn(batch, seq, dim, device=device, dtype=dtype)
    inputs = {
        "residual": h.clone().requires_grad_(),
        "hcext_mhc": expand_streams(h, streams).requires_grad_(),
        "ref_mhc": expand_streams(h, streams).requires_grad_(),
    }
    grads = {k: torch.randn_like(v) for k, v in inputs.items()}
    check = check_block(blocks["hcext_mhc"], blocks["ref_mhc"], inputs["hcext_mhc"], grads["hcext_mhc"])

    def step(name):
        def fn():
            out = blocks[name](inputs[name])
            params = [p for p in blocks[name].parameters()]
            torch.autograd.grad(out, [inputs[name], *params], grads[name])

        return fn

    timings = harness.time_interleaved({k: step(k) for k in blocks}, device, repeats=repeats, warmup=2)
    return batch * seq, timings, check


def check_block(block: Block, ref_block: Block, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """Before timing: the hcext mHC block (output, and the gradients of its input and of every
    parameter) against the same block on hcext.reference run in float64, by the test suite's
    tolerance table (bench_mhc.check_against_reference)."""
    names = [n for n, _ in block.named_parameters()]
    assert names == [n for n, _ in ref_block.named_parameters()]

    def as_fn(module):
        return lambda h, *params: torch.func.functional_call(module, dict(zip(names, params)), (h,))

    return check_against_reference(as_fn(block), as_fn(ref_block), [x, *block.parameters()], [grad],
                                   f"block {tuple(x.shape)} {x.dtype}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/block-<device>.json)")
    a = p.parse_args(argv)
    threads = harness.set_threads(a.threads) if a.device == "cpu" else None
    if a.quick:
        configs = [(torch.float32, 256, 64, 4, 4, 64)]
        repeats = 2
    elif a.device == "cpu":
        configs = [(torch.float32, 4096, 512, 8, 4, 512), (torch.bfloat16, 4096, 512, 8, 4, 512)]
        repeats = a.repeats
    else:
        configs = [(torch.bfloat16, 16384, 2048, 16, 4, 4096)]
        repeats = a.repeats
    rows, results = [], []
    for dtype, tokens, dim, heads, streams, seq in configs:
        T, t, check = run(a.device, dtype, tokens, dim, heads, streams, repeats, seq)
        dt = str(dtype).replace("torch.", "")
        key = (str(T), str(dim), str(streams), dt)
        rows.append((key, t))
        overhead = {k: t[k].median / t["residual"].median - 1 for k in ("hcext_mhc", "ref_mhc")}
        results.append(
            dict(
                tokens=T, dim=dim, heads=heads, streams=streams, seq=seq, dtype=dt, mode="fwd+bwd",
                timings_ms={k: v.samples_ms for k, v in t.items()},
                median_ms={k: v.median for k, v in t.items()},
                min_ms={k: v.min for k, v in t.items()},
                overhead_vs_residual=overhead,
                speedup_hcext_vs_ref=harness.speedup(t["ref_mhc"], t["hcext_mhc"]),
                check=check,
            )
        )
        print(f"tokens={T} dim={dim} n={streams} {dt}: mHC overhead vs residual: hcext {overhead['hcext_mhc']:+.1%}, "
              f"reference {overhead['ref_mhc']:+.1%}", flush=True)
    table = harness.markdown_table(
        rows, ["tokens", "dim", "n", "dtype"], ["residual", "hcext_mhc", "ref_mhc"],
        ratios=[("hcext vs reference mHC", "ref_mhc", "hcext_mhc")],
    )
    print(table)
    out = a.out or os.path.join(harness.RESULTS_DIR, f"block-{a.device}{'-quick' if a.quick else ''}.json")
    harness.write_json(out, harness.metadata(a.device, threads), results, config=dict(benchmark="block", quick=a.quick))
    print("wrote", out)


if __name__ == "__main__":
    main()
