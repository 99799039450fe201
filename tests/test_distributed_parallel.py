"""hcext under tensor, sequence, context and pipeline parallelism (issue 16): a tiny
transformer LM built from ``hcext.nn`` (attention / MLP sub-layers, each a
HyperConnection with n = 4 streams, in a HyperConnectionStack; kinds mHC, mHC, HC, static
HC so that every op family and the shared-coefficient path run) trained one step on
several ranks over gloo on the CPU. Every variant's loss and every parameter gradient
must equal the single-process model's on the same global batch.

Two spawned runs (each bounded in time) serve every test of this file:

* 2 processes: tensor + sequence parallel (``parallelize_module`` with Colwise / Rowwise
  linears and SequenceParallel norms; the streams are DTensors ``Shard(1)`` between the
  branches), with block recompute, under ``torch.compile`` (backend ``aot_eager``);
  context parallel on a long sequence (streams ``Shard(1)``, K/V all-gathered); pipeline
  parallel (``torch.distributed.pipelining``, 2 stages carrying the streams) with GPipe and
  1F1B, with and without block recompute, and compiled;
* 4 processes: a 2-D mesh, FSDP2 (``fully_shard``) x tensor + sequence parallel, eager
  and compiled.

Each scenario runs in a try block on every rank; a failure is recorded with its traceback
and reported by its test (so one broken scenario does not hide the others).
"""

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hcext  # noqa: F401
from hcext.distributed import collective_save_ops
from hcext.nn import HyperConnectionStack, expand_streams, reduce_streams

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

VOCAB, DIM, HEADS, STREAMS = 32, 16, 2, 4
KINDS = ("mhc", "mhc", "hc", "hc_static")  # attention, MLP, attention, MLP
BATCH, SEQ, LONG_SEQ = 4, 8, 64
TIMEOUT_S = {2: 170, 4: 150}
# fp32; the parallel runs sum in other orders (reduce-scatter, partial sums, the context
# parallel attention's explicit mask): a few ulps of the gradients' scale.
TOL = dict(atol=2e-5, rtol=2e-4)


# ---------------------------------------------------------------------------------------
# the model


class Attention(nn.Module):
    """Pre-Norm causal self-attention with separate q / k / v projections (so that
    ColwiseParallel splits heads). ``cp_mesh`` set: context parallel, the sequence is
    sharded (``Shard(1)`` DTensors), K and V are all-gathered (Llama 3's variant)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.head_dim = dim // heads
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.cp_mesh = None

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.wq(h), self.wk(h), self.wv(h)
        if self.cp_mesh is not None:
            return self.wo(self._context_parallel(q, k, v))
        B, T = q.shape[0], q.shape[1]  # local tensors under TP: this rank's heads
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _context_parallel(self, q, k, v):
        from torch.distributed.tensor import DTensor, Partial, Shard

        mesh = self.cp_mesh
        q = q.to_local()  # this rank's queries
        # Every rank's keys / values; their gradient is each rank's partial sum.
        k, v = (t.full_tensor(grad_placements=[Partial()]) for t in (k, v))
        B, Tq, T = q.shape[0], q.shape[1], k.shape[1]
        start = mesh.get_local_rank() * Tq  # even split: SEQ is a multiple of the mesh size
        mask = (torch.arange(Tq) + start)[:, None] >= torch.arange(T)[None, :]
        q, k, v = (t.view(B, t.shape[1], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return DTensor.from_local(y.transpose(1, 2).reshape(B, Tq, -1), mesh, [Shard(1)], run_check=False)


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


class LM(nn.Module):
    """tokens -> logits; a pipeline stage keeps a part: the first has no head (returns the
    streams), the others take streams (no embedding)."""

    def __init__(self, recompute_block=None, kinds=KINDS):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        branches = [Attention(DIM, HEADS) if i % 2 == 0 else MLP(DIM) for i in range(len(kinds))]
        layers = [hcext.nn.HyperConnection(DIM, STREAMS, kind=kind, branch=b, layer_index=i)
                  for i, (kind, b) in enumerate(zip(kinds, branches))]
        self.stack = HyperConnectionStack(layers, recompute_block)
        self.norm = nn.RMSNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, inputs):
        x = expand_streams(self.embed(inputs), STREAMS) if self.embed is not None else inputs
        x = self.stack(x)
        return self.head(self.norm(reduce_streams(x))) if self.head is not None else x


def build(recompute_block=None, seed=0):
    """Deterministic parameters, the hyper-connections moved away from their Pre-Norm
    initialisation so that the dynamic coefficients differ per token."""
    torch.manual_seed(seed)
    model = LM(recompute_block)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.stack.layers:
            for p in layer.parameters(recurse=False):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lm_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def batch(seq=SEQ, seed=1):
    return torch.randint(0, VOCAB, (BATCH, seq), generator=torch.Generator().manual_seed(seed))


def reference(tokens, recompute_block=None):
    """Single process: (loss, {name: grad})."""
    model = build(recompute_block)
    loss = lm_loss(model(tokens), tokens)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def full_grads(model, names=None):
    """Every parameter's gradient as a plain full tensor (DTensor grads, Partial or
    sharded, gathered). ``names``: the full model's names of the parameters (pipeline)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[names[id(p)] if names else name] = g.detach().clone()
    return out


# ---------------------------------------------------------------------------------------
# parallelisation plans


def tp_plan(model):
    """Tensor + sequence parallel, placements written out. Between the branches the
    streams [B, T, n, C] are DTensors Shard(1) (the sequence); every HyperConnection runs
    its ops on its tokens (its parameters become Replicate DTensors, their gradients are
    all-reduced)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    # The embedding's output (and so the streams) is sequence-sharded, a DTensor.
    plan = {"embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)}
    for i, layer in enumerate(model.stack.layers):
        p = f"stack.layers.{i}.branch."
        plan[p + "norm"] = SequenceParallel()  # Shard(1) in, Shard(1) DTensor out
        if isinstance(layer.branch, Attention):
            for name in ("wq", "wk", "wv"):  # all-gather the sequence, split the heads
                plan[p + name] = ColwiseParallel(input_layouts=Shard(1))
            last = "wo"
        else:
            plan[p + "up"] = ColwiseParallel(input_layouts=Shard(1))
            last = "down"
        # reduce-scatter back to the sequence; a DTensor, like the streams it is added to
        plan[p + last] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    plan["norm"] = SequenceParallel()
    plan["head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())  # full logits
    return plan


# ---------------------------------------------------------------------------------------
# scenarios (run on every rank; return (loss, grads) on the ranks that report)


def compiled(model, stats):
    """``torch.compile(model, backend="aot_eager")`` that records in ``stats`` the hcext ops
    of the forward and backward graphs AOTAutograd traced (through DTensor: the ops on the
    local shards) and the number of dynamo graphs."""
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    def recording(kind):
        def compiler(gm, example_inputs):
            stats.setdefault(kind, set()).update(
                n.target.name() for n in gm.graph.nodes
                if n.op == "call_function" and getattr(n.target, "namespace", None) == "hcext")
            return boxed_nop(gm, example_inputs)
        return compiler

    def backend(gm, example_inputs):
        stats["graphs"] = stats.get("graphs", 0) + 1
        return aot_eager(gm, example_inputs, fw_compiler=recording("forward"), bw_compiler=recording("backward"))

    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def run_tp_sp(tokens, compile=False, recompute_block=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = build(recompute_block)
    parallelize_module(model, mesh, tp_plan(model))
    stats = {}
    fn = compiled(model, stats) if compile else model
    loss = lm_loss(fn(tokens), tokens)
    loss.backward()
    return loss.detach(), full_grads(model), stats


def run_context_parallel(tokens, compile=False, recompute_block=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = build(recompute_block)
    for layer in model.stack.layers:
        if isinstance(layer.branch, Attention):
            layer.branch.cp_mesh = mesh
    distribute_module(model, mesh)  # every parameter Replicate
    stats = {}
    fn = compiled(model, stats) if compile else model
    logits = fn(distribute_tensor(tokens, mesh, [Shard(1)]))  # Shard(1) all the way
    loss = lm_loss(logits.full_tensor(), tokens)
    loss.backward()
    return loss.detach(), full_grads(model), stats


def run_pipeline(tokens, schedule, recompute_block=None, compile=False, microbatches=2):
    """2 stages (one per rank): embedding + sub-layer 0 | sub-layers 1-3 + norm + head.
    The streams [B/m, T, n, C] are what goes between the stages. Sub-layers 0 and 1 are
    both mHC: the single-process stack fuses their boundary (mhc_post_pre), the stages
    cannot (stream_mix_expand, send, mhc_pre): equal up to fp32 rounding."""
    from torch.distributed import pipelining

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = build(recompute_block)
    names = {id(p): name for name, p in model.named_parameters()}
    layers = list(model.stack.layers)
    split = 1
    if rank == 0:
        model.stack.layers = nn.ModuleList(layers[:split])
        model.norm = model.head = None
    else:
        model.stack.layers = nn.ModuleList(layers[split:])
        model.embed = None
    stats = {}
    stage_module = compiled(model, stats) if compile else model
    stage = pipelining.PipelineStage(stage_module, rank, world, torch.device("cpu"))
    cls = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B}[schedule]
    sched = cls(stage, microbatches, loss_fn=lm_loss)  # grads scaled by 1/microbatches: the mean
    if rank == 0:
        sched.step(tokens)
        loss = None
    else:
        losses = []
        sched.step(target=tokens, losses=losses)
        loss = torch.stack([l.detach() for l in losses]).mean()
    return loss, full_grads(model, names), stats


def run_fsdp_tp(tokens, compile=False, recompute_block=None):
    """2-D mesh (dp 2, tp 2): FSDP2 over dp, tensor + sequence parallel over tp; each dp
    rank takes half of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_group()
    model = build(recompute_block)
    if recompute_block:  # keep the TP collectives' outputs rather than communicating again
        model.stack.policy = hcext.nn.make_recompute_policy(hcext.nn.DEFAULT_SAVE_OPS + collective_save_ops())
    parallelize_module(model, mesh["tp"], tp_plan(model))
    # fully_shard refuses 0-dim parameters (dynamic HC's alpha_scale, beta_scale): they stay
    # whole on every rank and their gradients are averaged over dp below.
    scalars = {p for p in model.parameters() if p.dim() == 0}
    # FSDP units: the branches, not the HyperConnection layers (HyperConnectionStack calls an
    # mHC layer's ops itself, for the fused boundaries, so a layer's own unshard hook would
    # not run and hcext would reject its still-sharded parameters); the root unit holds the
    # HC parameters. With block recompute, a unit must hold whole recompute blocks (FSDP's
    # hooks inside a selective-checkpoint region run other ops in the recompute): the stack.
    units = [model.stack] if recompute_block else [layer.branch for layer in model.stack.layers]
    for unit in units:
        fully_shard(unit, mesh=mesh["dp"], ignored_params=scalars)
    fully_shard(model, mesh=mesh["dp"], ignored_params=scalars)
    local = tokens.chunk(2)[mesh["dp"].get_local_rank()]
    stats = {}
    fn = compiled(model, stats) if compile else model
    loss = lm_loss(fn(local), local)
    loss.backward()
    for p in scalars:
        torch.distributed.all_reduce(p.grad, group=dp)
        p.grad /= 2
    # FSDP averages the gradients over dp: the global batch's mean. The loss: the mean of
    # the dp ranks' means (equal halves).
    loss = loss.detach().clone()
    torch.distributed.all_reduce(loss, group=dp)
    return loss / 2, full_grads(model), stats


SCENARIOS = {
    2: {
        "tp_sp": lambda: run_tp_sp(batch()),
        "tp_sp_recompute": lambda: run_tp_sp(batch(), recompute_block=1),
        "tp_sp_compile": lambda: run_tp_sp(batch(), compile=True),
        "context_parallel": lambda: run_context_parallel(batch(LONG_SEQ)),
        "context_parallel_recompute": lambda: run_context_parallel(batch(LONG_SEQ), recompute_block=2),
        "context_parallel_compile": lambda: run_context_parallel(batch(LONG_SEQ), compile=True),
        "pp_gpipe": lambda: run_pipeline(batch(), "gpipe"),
        "pp_1f1b": lambda: run_pipeline(batch(), "1f1b", microbatches=4),
        "pp_gpipe_recompute": lambda: run_pipeline(batch(), "gpipe", recompute_block=1),
        "pp_1f1b_recompute": lambda: run_pipeline(batch(), "1f1b", recompute_block=1, microbatches=4),
        "pp_1f1b_compile": lambda: run_pipeline(batch(), "1f1b", compile=True),
    },
    4: {
        "fsdp_tp": lambda: run_fsdp_tp(batch()),
        "fsdp_tp_recompute": lambda: run_fsdp_tp(batch(), recompute_block=2),
        "fsdp_tp_compile": lambda: run_fsdp_tp(batch(), compile=True),
    },
}
# What each scenario must equal: (tokens, recompute_block) of the single-process model.
REFERENCE = {
    "context_parallel": (LONG_SEQ, None), "context_parallel_recompute": (LONG_SEQ, None),
    "context_parallel_compile": (LONG_SEQ, None),
}


def worker(rank, world_size, port, out_dir, only=None):
    """One rank: every scenario of this world size in turn; saves ``result_<rank>.pt``:
    {scenario: (loss or None, grads) or the error's traceback}."""
    import torch.distributed as dist

    from helpers import run_rank_and_exit

    def init():
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))

    def body():
        results = {}
        for name, fn in SCENARIOS[world_size].items():
            if only and name not in only:
                continue
            start = time.perf_counter()
            try:
                results[name] = fn()
            except Exception:
                results[name] = traceback.format_exc()
            results[name + ":seconds"] = time.perf_counter() - start
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"result_{rank}.pt"))
        dist.barrier()

    run_rank_and_exit(init, body, dist.destroy_process_group)


# ---------------------------------------------------------------------------------------
# the runs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size, out_dir, only=None, timeout_s=None):
    """Spawns ``world_size`` ranks of :func:`worker`; returns the per-rank results.
    Bounded: ranks alive after ``timeout_s`` are killed and the caller fails."""
    import torch.multiprocessing as mp

    timeout_s = timeout_s or TIMEOUT_S[world_size]
    ctx = mp.start_processes(worker, args=(world_size, _free_port(), str(out_dir), only), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]


def _merge(per_rank, name):
    """(loss, grads, compile stats) of a scenario from every rank's results (pipeline
    stages each hold their own parameters' gradients; other scenarios hold all of them on
    every rank)."""
    loss, grads, stats = None, {}, {}
    for r, results in enumerate(per_rank):
        got = results.get(name)
        if got is None:
            pytest.fail(f"{name}: no result from rank {r}")
        if isinstance(got, str):
            pytest.fail(f"{name} failed on rank {r}:\n{got}")
        rank_loss, rank_grads, rank_stats = got
        loss = rank_loss if rank_loss is not None else loss
        for k, g in rank_grads.items():
            grads.setdefault(k, g)
        for k in ("forward", "backward"):
            stats.setdefault(k, set()).update(rank_stats.get(k, ()))
    return loss, grads, stats


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    try:
        return run_ranks(2, tmp_path_factory.mktemp("dist2"))
    except TimeoutError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    try:
        return run_ranks(4, tmp_path_factory.mktemp("dist4"))
    except TimeoutError as e:
        pytest.fail(str(e))


_references = {}


def check(per_rank, name):
    seq, recompute = REFERENCE.get(name, (SEQ, None))
    if (seq, recompute) not in _references:
        _references[(seq, recompute)] = reference(batch(seq), recompute)
    want_loss, want = _references[(seq, recompute)]
    loss, got, stats = _merge(per_rank, name)
    assert loss is not None
    if name.endswith("_compile"):
        # The compiled graphs hold hcext's ops, forward and backward (on the local shards).
        assert {"hcext::stream_mix_expand", "hcext::hc_coeffs_fwd"} <= stats["forward"], stats
        assert {"hcext::stream_mix_expand_backward", "hcext::hc_coeffs_backward"} <= stats["backward"], stats
        assert stats["forward"] & {"hcext::mhc_pre_fwd", "hcext::mhc_post_pre_fwd"}, stats
        assert stats["backward"] & {"hcext::mhc_backward", "hcext::mhc_post_pre_backward"}, stats
    torch.testing.assert_close(loss, want_loss, **TOL)
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{name}: grad of {k}: {m}")


@pytest.mark.parametrize("name", list(SCENARIOS[2]))
def test_two_ranks_match_single_process(two_ranks, name):
    check(two_ranks, name)


@pytest.mark.parametrize("name", list(SCENARIOS[4]))
def test_fsdp2_x_tensor_parallel_four_ranks_match_single_process(four_ranks, name):
    check(four_ranks, name)


if __name__ == "__main__":  # debugging: python tests/test_distributed_parallel.py WORLD [scenario ...]
    import sys
    import tempfile

    world = int(sys.argv[1])
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        per_rank = run_ranks(world, d, only=sys.argv[2:] or None, timeout_s=600)
        print(f"{world} ranks: {time.perf_counter() - start:.1f} s")
        for name in SCENARIOS[world]:
            if name in per_rank[0]:
                try:
                    check(per_rank, name)
                    status = "ok"
                except BaseException as e:  # noqa: B036
                    status = f"FAIL {str(e)[:3000]}"
                print(f"{name}: {per_rank[0][name + ':seconds']:.1f} s {status}")
