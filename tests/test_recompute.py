"""Block recompute of the stream state (mHC §4.3.2): ``hcext.nn.HyperConnectionStack`` with
``recompute_block`` runs blocks of L_r sub-layers under selective activation checkpointing
(``hcext.nn.recompute_policy``: matmuls / attention / random ops saved, hcext's stream ops and
the cheap ops recomputed).

Checked here: outputs and gradients bitwise equal to no recompute (eager, fp32, several L_r,
every kind); torch.compile(fullgraph=True) (aot_eager, inductor); a branch that checkpoints
itself; the default L_r; no checkpointing in eval mode / under no_grad; and, in a subprocess
that counts live heap bytes (glibc mallinfo2, big tensors mmapped), that recompute keeps what
the paper says it keeps: x_{l0} per block plus the branches' matmul outputs; and the memory
benchmark's --quick mode (benchmarks/bench_memory.py).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hcext.nn import (
    DEFAULT_SAVE_OPS,
    HyperConnection,
    HyperConnectionStack,
    expand_streams,
    make_recompute_policy,
    recompute_block_size,
    recompute_policy,
)
from helpers import assert_close_dtype, assert_scaled_close

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, N, B, S = 32, 4, 2, 8  # T = B * S = 16 tokens


class MLP(nn.Module):
    """Pre-Norm MLP branch; ``checkpointed=True`` runs it under its own (ordinary) checkpoint."""

    def __init__(self, dim, checkpointed=False, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))
        self.checkpointed = checkpointed

    def forward(self, h):
        return checkpoint(self.net, h, use_reentrant=False) if self.checkpointed else self.net(h)


class Attention(nn.Module):
    """Pre-Norm causal self-attention branch (F.scaled_dot_product_attention)."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.norm, self.heads = nn.RMSNorm(dim), heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, h):
        b, s, c = h.shape
        q, k, v = self.qkv(self.norm(h)).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, c))


def build(L, kind="mhc", attention=True, **branch_kwargs):
    """A stack of L sub-layers (attention, MLP, attention, ... or MLPs only), with every
    parameter perturbed so that the coefficients are token-dependent and the streams differ."""
    branches = [Attention(C) if attention and i % 2 == 0 else MLP(C, **branch_kwargs) for i in range(L)]
    stack = HyperConnectionStack.from_branches(branches, C, N, kind=kind, recompute_block=None)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return stack


def streams_input():
    return expand_streams(torch.randn(B, S, C), N) + 0.1 * torch.randn(B, S, N, C)


def run(model, x, seed=0):
    """(output, [grad of x, grads of the parameters]) of a fixed weighted-sum loss."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # dropout
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in model.parameters()]


def with_block(stack, block):
    stack.recompute_block = block
    return stack


def assert_bitwise(got, want):
    (out, grads), (out_ref, grads_ref) = got, want
    assert torch.equal(out, out_ref)
    assert len(grads) == len(grads_ref)
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        assert g is not None and torch.equal(g, r), f"gradient {i} differs (max {(g - r).abs().max().item():.3g})"


# ---------------------------------------------------------------------------------------
# (a), (b): eager, bitwise


@pytest.mark.parametrize("block", [1, 2, 4, 6, "auto"])  # L = 6: 4 is not a divisor, 6 = L, auto = 2
def test_recompute_bitwise_equal_mhc(block):
    stack = build(6)
    x = streams_input()
    want = run(with_block(stack, None), x)
    got = run(with_block(stack, block), x)
    assert stack.recomputing()
    assert_bitwise(got, want)


def _count_hcext_ops(fn):
    """Runs fn() and counts the hcext ops it dispatches (forward and backward)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "hcext":
                counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


@pytest.mark.parametrize("block", [None, 2])
def test_stack_fuses_layer_boundaries(block):
    # Between consecutive mHC sub-layers the stack calls hcext::mhc_post_pre (across recompute
    # blocks too): L - 1 boundaries, one mhc_pre and one stream_mix_expand at the ends.
    stack = with_block(build(6), block)
    x = streams_input()
    counts = _count_hcext_ops(lambda: run(stack, x))
    recomputed = 2 if block else 1  # with recompute, each forward op runs again in backward
    assert counts["mhc_post_pre_fwd"] == 5 * recomputed
    assert counts["mhc_pre_fwd"] == 1 * recomputed and counts["stream_mix_expand"] == 1 * recomputed
    assert counts["mhc_post_pre_backward"] == 5


def test_fused_boundaries_match_unfused():
    stack = build(6)
    x = streams_input()
    fused = run(stack, x)
    stack.fuse_boundaries = False
    counts = _count_hcext_ops(lambda: run(stack, x))
    assert counts["mhc_post_pre_fwd"] == 0 and counts["mhc_pre_fwd"] == 6
    unfused = run(stack, x)
    (out, grads), (out_ref, grads_ref) = fused, unfused
    assert_close_dtype(out, out_ref)
    for g, r in zip(grads, grads_ref):
        assert_scaled_close(g, r)
    for block in (2, 4):  # and with fusion off, recompute is bitwise too
        assert_bitwise(run(with_block(stack, block), x), unfused)


@pytest.mark.parametrize("kind", ["hc", "hc_static"])
def test_recompute_bitwise_equal_hc_kinds(kind):
    stack = build(5, kind=kind)
    x = streams_input()
    want = run(with_block(stack, None), x)
    for block in (2, 3):
        assert_bitwise(run(with_block(stack, block), x), want)


def test_recompute_with_dropout_in_branches():
    # CPU dropout is bernoulli_ (in place, recomputed under the restored RNG state).
    stack = build(4, attention=False, dropout=0.3)
    x = streams_input()
    want = run(with_block(stack, None), x, seed=5)
    assert_bitwise(run(with_block(stack, 3), x, seed=5), want)


def test_extra_arguments_reach_every_layer():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(C, C)

        def forward(self, h, scale):
            return self.lin(h) * scale

    stack = HyperConnectionStack.from_branches([Scaled() for _ in range(3)], C, N, recompute_block=2)
    x = streams_input().requires_grad_()
    out = stack(x, 0.5)
    ref = x
    for layer in stack.layers:
        ref = layer(ref, 0.5)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------
# (c): torch.compile


def _compiled_grads(stack, block, x, backend):
    torch._dynamo.reset()
    with_block(stack, block)
    return run(torch.compile(stack, backend=backend, fullgraph=True), x)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_recompute_under_compile(backend):
    stack = build(4)
    x = streams_input()
    eager = run(with_block(stack, None), x)
    compiled = _compiled_grads(stack, None, x, backend)
    compiled_rc = _compiled_grads(stack, 2, x, backend)
    if backend == "aot_eager":  # the same aten ops, run eagerly: bitwise
        assert_bitwise(compiled_rc, compiled)
        assert_bitwise(compiled_rc, eager)
    else:  # inductor fuses differently with and without recompute
        for got, want in ((compiled_rc, compiled), (compiled_rc, eager)):
            assert_close_dtype(got[0], want[0])
            for g, r in zip(got[1], want[1]):
                assert_close_dtype(g, r)


def test_recompute_with_dropout_under_compile():
    # Functionalised, the dropout draw is an out-of-place op whose output the policy saves.
    stack = build(4, attention=False, dropout=0.3)
    x = streams_input()
    assert_bitwise(_compiled_grads(stack, 2, x, "aot_eager"), _compiled_grads(stack, None, x, "aot_eager"))


# ---------------------------------------------------------------------------------------
# (d): a branch that uses torch.utils.checkpoint itself


def test_branch_with_its_own_checkpoint():
    stack = build(4, attention=False, checkpointed=True)
    plain = build(4, attention=False)
    plain.load_state_dict(stack.state_dict())
    x = streams_input()
    want = run(with_block(plain, None), x)
    assert_bitwise(run(with_block(stack, None), x), want)
    assert_bitwise(run(with_block(stack, 2), x), want)
    assert_bitwise(run(with_block(stack, 3), x), want)


# ---------------------------------------------------------------------------------------
# (e): L_r


def test_default_block_size():
    # mHC §4.3.2: L_r = round(sqrt(n L / (n + 2))), at least 1, at most L.
    assert recompute_block_size(4, 24) == 4  # sqrt(16)
    assert recompute_block_size(4, 6) == 2
    assert recompute_block_size(4, 60) == 6  # sqrt(40) = 6.32
    assert recompute_block_size(4, 100) == 8  # sqrt(66.7) = 8.16
    assert recompute_block_size(2, 8) == 2
    assert recompute_block_size(1, 1) == 1 and recompute_block_size(4, 1) == 1
    branches = [MLP(C) for _ in range(24)]
    stack = HyperConnectionStack.from_branches(branches, C, N)  # from_branches defaults to "auto"
    assert stack.recompute_block == "auto" and stack.block_size == 4
    assert stack.blocks() == [(i, i + 4) for i in range(0, 24, 4)]


def test_block_size_values_and_errors():
    stack = build(5, attention=False)
    assert with_block(stack, None).block_size == 0 and with_block(stack, 0).block_size == 0
    assert with_block(stack, 0).blocks() == [(0, 5)]
    assert with_block(stack, 2).blocks() == [(0, 2), (2, 4), (4, 5)]
    assert with_block(stack, 9).block_size == 5  # clamped to L
    layers = list(stack.layers)
    for bad in (-1, "sqrt", 1.5, True):
        with pytest.raises(ValueError, match="recompute_block"):
            HyperConnectionStack(layers, bad)
    with pytest.raises(TypeError, match="HyperConnection with a branch"):
        HyperConnectionStack([HyperConnection(C, N)])
    with pytest.raises(TypeError, match="HyperConnection with a branch"):
        HyperConnectionStack([MLP(C)])
    with pytest.raises(ValueError, match="num_streams"):
        HyperConnectionStack([HyperConnection(C, 4, branch=MLP(C)), HyperConnection(C, 2, branch=MLP(C))])


def test_policy_and_save_ops():
    aten = torch.ops.aten
    from torch.utils.checkpoint import CheckpointPolicy as P

    for op in (aten.mm.default, aten.addmm.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
               aten.native_dropout.default):
        assert recompute_policy(None, op) == P.MUST_SAVE
    for op in (torch.ops.hcext.mhc_pre_fwd.default, torch.ops.hcext.stream_mix_expand.default,
               torch.ops.hcext.stream_aggregate.default, aten.mean.dim, aten.add_.Scalar, aten.gelu.default,
               aten.bernoulli_.float):  # in-place: its output must not be cached
        assert recompute_policy(None, op) == P.PREFER_RECOMPUTE
    assert aten.mm in DEFAULT_SAVE_OPS
    custom = make_recompute_policy([aten.mm, aten.gelu.default])
    assert custom(None, aten.gelu.default) == P.MUST_SAVE and custom(None, aten.addmm.default) == P.PREFER_RECOMPUTE

    # A stack with its own save list (here: nothing saved, the branches re-run too) still
    # computes the same gradients, and its policy sees the hcext ops.
    seen = set()

    def spy(ctx, func, *args, **kwargs):
        seen.add(str(func))
        return P.PREFER_RECOMPUTE

    stack = build(4)
    x = streams_input()
    want = run(with_block(stack, None), x)
    assert_bitwise(run(HyperConnectionStack(list(stack.layers), 2, policy=spy), x), want)
    assert {"hcext.mhc_pre_fwd.default", "hcext.stream_mix_expand.default"} <= seen
    assert_bitwise(run(HyperConnectionStack(list(stack.layers), 2, save_ops=[]), x), want)


# ---------------------------------------------------------------------------------------
# (f): eval mode and no_grad do not checkpoint


def test_no_checkpoint_in_eval_or_no_grad(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    stack = with_block(build(5, attention=False), 2)
    x = streams_input()
    out = stack(x.requires_grad_())
    assert len(calls) == 3 and stack.recomputing()  # blocks [0, 2), [2, 4), [4, 5)
    with torch.no_grad():
        assert not stack.recomputing()
        assert torch.equal(stack(x), out)
    stack.eval()
    assert not stack.recomputing()
    out_eval = stack(x)
    assert out_eval.requires_grad and torch.equal(out_eval, out)
    stack.train()
    with_block(stack, None)
    assert not stack.recomputing() and torch.equal(stack(x), out)
    assert len(calls) == 3


def test_layers_must_return_streams():
    class WithAux(nn.Module):
        def forward(self, h):
            return h, torch.zeros(())

    stack = HyperConnectionStack([HyperConnection(C, N, branch=WithAux())], 1)
    with pytest.raises(TypeError, match="not a tensor"):
        stack(streams_input())


# ---------------------------------------------------------------------------------------
# (g): memory kept for backward


MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    import torch
    from torch import nn
    from hcext.nn import HyperConnectionStack, expand_streams

    torch.set_num_threads(1)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def live():  # bytes malloc'ed and not freed: heap chunks in use + mmapped chunks
        gc.collect()
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    # The method, on a known pattern: 8 MiB + 16 MiB, free the 8, + 4 MiB -> 20 MiB live.
    base = live()
    a, b = torch.empty(2**21), torch.empty(2**22)
    del a
    c = torch.empty(2**20)
    check = live() - base
    del b, c

    C, n, L, B, S = 64, 4, 8, 2, 256

    def mlp():
        return nn.Sequential(nn.RMSNorm(C), nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))

    def kept_after_forward(block, compile_=False):
        torch.manual_seed(0)
        stack = HyperConnectionStack.from_branches([mlp() for _ in range(L)], C, n, recompute_block=block)
        model = torch.compile(stack, backend="aot_eager", fullgraph=True) if compile_ else stack
        x = expand_streams(torch.randn(B, S, C), n).requires_grad_()
        for _ in range(2):  # warm-up; allocates the .grad buffers
            out = model(x)
            out.backward(torch.ones_like(out))
            del out
        base = live()
        out = model(x)
        kept = live() - base
        out.backward(torch.ones_like(out))
        return kept

    blocks = [None, 1, 2, 8]
    result = {"check": check, "eager": {str(b): kept_after_forward(b) for b in blocks},
              "compiled": {str(b): kept_after_forward(b, True) for b in (None, 2)}}
    print(json.dumps(result))
    """
)


def test_recompute_keeps_less_memory():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    MiB, KiB = 2**20, 2**10
    assert 20 * MiB <= r["check"] < 20 * MiB + 64 * KiB  # the method counts what is live
    C, n, L, T, f32 = 64, 4, 8, 2 * 256, 4
    eager = r["eager"]
    # Without recompute each mHC sub-layer keeps its streams x_l (n C per token), its layer input,
    # the norm's input, normalised input and output, the up-projection and GELU outputs (2 C
    # each), F's output and the coefficients: about 12 C per token at n = 4.
    assert eager["None"] > 10 * C * f32 * T * L
    # With recompute: at every block boundary after the first block (the first input is allocated
    # before) x_{l0} and, since the fused boundary op (mhc_post_pre) crosses it, the block's first
    # layer input (C) and coefficients h_post, h_res (n + n*n) + per sub-layer the outputs of its
    # two matmuls (2 C + C) + the output streams, plus a little (autograd's nodes, small tensors).
    for block in (1, 2, 8):
        blocks = -(-L // block)
        expected = f32 * T * ((blocks - 1) * (n * C + C + n + n * n) + L * 3 * C + n * C)
        kept = eager[str(block)]
        assert expected <= kept <= 1.1 * expected, (block, kept, expected)
    assert eager["2"] < 0.5 * eager["None"]
    assert eager["8"] < eager["2"] < eager["1"]  # fewer blocks, fewer stored x_{l0}
    # torch.compile applies the same policy; its partitioner may keep less than eager (it can
    # recompute the block-boundary layer inputs and coefficients from what it saves), not more.
    assert r["compiled"]["2"] < 0.5 * r["compiled"]["None"]
    assert r["compiled"]["2"] < 1.1 * eager["2"]


def test_bench_memory_quick(tmp_path):
    """benchmarks/bench_memory.py --quick: the four variants, their ratios, the method check."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from benchmarks import bench_memory

    out = tmp_path / "memory.json"
    bench_memory.main(["--quick", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"metadata", "config", "summary", "results"} <= set(data)
    assert data["config"]["benchmark"] == "memory" and data["config"]["quick"] is True
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == ["residual", "mhc", "mhc_recompute", "residual_sac"]
    assert rows["residual"]["peak_vs_residual"] == 1.0 and rows["residual_sac"]["peak_vs_residual_sac"] == 1.0
    assert rows["mhc_recompute"]["block_size"] == 2 and rows["mhc"]["block_size"] == 0
    for r in rows.values():
        assert 0 < r["saved_after_forward_mib"] <= r["activation_peak_mib"]
    assert rows["mhc_recompute"]["saved_after_forward_mib"] < rows["mhc"]["saved_after_forward_mib"]
    check = data["summary"]["method_check"]
    assert abs(check["peak"] - check["expected_peak"]) < 0.01 * check["expected_peak"]
    assert abs(check["live"] - check["expected_live"]) < 0.01 * check["expected_live"]
