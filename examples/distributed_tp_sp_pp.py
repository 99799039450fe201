"""hcext under torchtitan-style parallelism: pipeline (PP) x data (FSDP2) x tensor + sequence
parallel (TP + SP) on one device mesh, on the CPU with gloo.

    torchrun --nproc-per-node 2 examples/distributed_tp_sp_pp.py            # TP+SP 2, then PP 2
    torchrun --nproc-per-node 4 examples/distributed_tp_sp_pp.py            # PP 2 x TP+SP 2
    torchrun --nproc-per-node 4 examples/distributed_tp_sp_pp.py --mesh 1,2,2 --recompute 2   # FSDP 2 x TP 2
    python examples/distributed_tp_sp_pp.py --help

A small decoder LM whose attention / MLP sub-layers are mHC hyper-connections
(``hcext.nn.HyperConnectionStack``, n = 4 streams) is trained for a few AdamW steps on a
fixed batch with every layout in turn; each rank then trains the same model in one process
and the script checks that the losses agree (exit status 1 if not).

Placements (TP mesh of size tp; B batch, T sequence, n streams, C channels):

    tokens [B, T]                 plain tensor, every TP rank the same (Replicate)
    embedding                     RowwiseParallel: weight Shard(0), output Shard(1) (reduce-scatter)
    streams [B, T, n, C]          DTensor Shard(1) between the branches: hcext's ops run on the
                                  local tokens; the HC parameters are Replicate, their
                                  gradients Partial -> all-reduced
    branch norm                   SequenceParallel: Shard(1) in, Shard(1) out
    wq, wk, wv / up               ColwiseParallel(input_layouts=Shard(1)): all-gather T, split heads / hidden
    wo / down                     RowwiseParallel(output_layouts=Shard(1), use_local_output=False):
                                  reduce-scatter back to T, a DTensor like the streams
    final norm                    SequenceParallel
    head                          ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    PP stage boundary             the local streams [B/m, T/tp, n, C] (each TP rank sends its
                                  sequence shard to the same TP rank of the next stage)
    FSDP2 (dp)                    every parameter Shard(0) over dp, gathered per unit
"""

import argparse
import datetime
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import hcext
import hcext.distributed  # noqa: F401  (collective_save_ops)
from hcext.nn import HyperConnectionStack, expand_streams, reduce_streams

VOCAB, DIM, HEADS, STREAMS, LAYERS = 64, 32, 4, 4, 4  # LAYERS transformer blocks = 2 * LAYERS sub-layers


class Attention(nn.Module):
    """Pre-Norm causal self-attention; separate q / k / v so that ColwiseParallel splits heads."""

    def __init__(self, dim, heads):
        super().__init__()
        self.head_dim = dim // heads
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.wq(h), self.wk(h), self.wv(h)  # under TP: local [B, T, C / tp], this rank's heads
        B, T = q.shape[0], q.shape[1]
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    """tokens -> logits. A pipeline stage keeps a slice: the first stage has no head and
    returns the streams, the others take streams and have no embedding."""

    def __init__(self, recompute_block=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        branches = [m for _ in range(LAYERS) for m in (Attention(DIM, HEADS), MLP(DIM))]
        self.stack = HyperConnectionStack.from_branches(branches, DIM, STREAMS, recompute_block=recompute_block)
        self.norm = nn.RMSNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.tp_mesh = None  # set by apply_tp on a pipeline stage: streams cross stages as local shards

    def forward(self, inputs):
        if self.embed is not None:
            x = expand_streams(self.embed(inputs), STREAMS)
        elif self.tp_mesh is not None:  # this TP rank's sequence shard, from the previous stage
            from torch.distributed.tensor import DTensor, Shard

            x = DTensor.from_local(inputs, self.tp_mesh, [Shard(1)], run_check=False)
        else:
            x = inputs
        x = self.stack(x)
        if self.head is None:  # a stage that sends its streams on
            return x.to_local() if self.tp_mesh is not None else x
        return self.head(self.norm(reduce_streams(x)))


def build(recompute_block=None, seed=0):
    torch.manual_seed(seed)
    model = Model(recompute_block)
    with torch.no_grad():  # away from the Pre-Norm-equivalent init, so that coefficients differ per token
        g = torch.Generator().manual_seed(seed)
        for p in (p for layer in model.stack.layers for p in layer.parameters(recurse=False)):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def loss_fn(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------
# parallelisms, applied in torchtitan's order: pipeline split, TP + SP, (recompute is in the
# stack), FSDP2


def pipeline_split(model, pp_rank, pp_size):
    """Keeps this stage's slice of the sub-layers (equal parts), the embedding on the first
    stage and the final norm + head on the last."""
    layers = list(model.stack.layers)
    per_stage = len(layers) // pp_size
    model.stack.layers = nn.ModuleList(layers[pp_rank * per_stage:(pp_rank + 1) * per_stage])
    if pp_rank > 0:
        model.embed = None
    if pp_rank < pp_size - 1:
        model.norm = model.head = None
    return model


def apply_tp(model, tp_mesh, pipelined):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module)

    plan = {}
    if model.embed is not None:
        plan["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)
    for i, layer in enumerate(model.stack.layers):
        p = f"stack.layers.{i}.branch."
        plan[p + "norm"] = SequenceParallel()
        if isinstance(layer.branch, Attention):
            plan.update({p + n: ColwiseParallel(input_layouts=Shard(1)) for n in ("wq", "wk", "wv")})
            plan[p + "wo"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        else:
            plan[p + "up"] = ColwiseParallel(input_layouts=Shard(1))
            plan[p + "down"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    if model.head is not None:
        plan["norm"] = SequenceParallel()
        plan["head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    if pipelined:
        model.tp_mesh = tp_mesh
    if model.stack.recompute_block:  # keep TP's collectives in the recompute blocks (else re-run in backward)
        save = hcext.nn.DEFAULT_SAVE_OPS + hcext.distributed.collective_save_ops()
        model.stack.policy = hcext.nn.make_recompute_policy(save)
    return model


def apply_fsdp(model, dp_mesh, pipelined):
    from torch.distributed.fsdp import fully_shard

    # FSDP2 refuses 0-dim parameters (dynamic HC's scales; none in this mHC model): keep them
    # whole and all-reduce their gradients over dp yourself.
    scalars = {p for p in model.parameters() if p.dim() == 0}
    # One unit per stack: a unit must hold whole recompute blocks, and HyperConnectionStack
    # runs mHC layers' ops itself (a unit per HyperConnection would never be gathered).
    # Without recompute, one unit per branch is finer (then the root holds the HC parameters).
    kw = dict(mesh=dp_mesh, ignored_params=scalars, reshard_after_forward=not pipelined)
    units = [model.stack] if model.stack.recompute_block else [layer.branch for layer in model.stack.layers]
    for unit in units:
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return model


def train_parallel(args, pp, dp, tp, batches):
    """Losses of ``args.steps`` AdamW steps on the (pp, dp, tp) mesh (the same on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    model = build(args.recompute)
    if pp > 1:
        pipeline_split(model, pp_rank, pp)
    if tp > 1:
        apply_tp(model, mesh["tp"], pipelined=pp > 1)
    if dp > 1:
        apply_fsdp(model, mesh["dp"], pipelined=pp > 1)
    stage_module = torch.compile(model, backend=args.compile) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if pp > 1:
        from torch.distributed import pipelining

        stage = pipelining.PipelineStage(stage_module, pp_rank, pp, torch.device("cpu"), group=mesh["pp"].get_group())
        schedule_cls = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B}[args.schedule]
        schedule = schedule_cls(stage, args.microbatches, loss_fn=loss_fn)
    losses = []
    for tokens in batches:
        local = tokens.chunk(dp)[dp_rank]
        opt.zero_grad()
        if pp > 1:
            mb_losses = []
            if pp_rank == 0:
                schedule.step(local)
            else:
                schedule.step(target=local, losses=mb_losses)
            loss = torch.stack(mb_losses).mean().detach() if mb_losses else torch.zeros(())
        else:
            loss = loss_fn(stage_module(local), local)
            loss.backward()
            loss = loss.detach()
        scalars = [p for p in model.parameters() if p.dim() == 0 and p.grad is not None]
        for p in scalars:  # the FSDP-ignored parameters (none in this model)
            if dp > 1:
                dist.all_reduce(p.grad, group=mesh["dp"].get_group())
                p.grad /= dp
        opt.step()
        # The mean over dp, from the last stage to every rank (for printing and checking).
        loss = loss.clone()
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        if pp > 1:
            dist.all_reduce(loss, group=mesh["pp"].get_group())  # only the last stage's is non-zero
        losses.append(loss.item() / dp)
    return losses


def train_single(args, batches):
    model = build(args.recompute)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for tokens in batches:
        opt.zero_grad()
        loss = loss_fn(model(tokens), tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", action="append", default=None,
                        help="pp,dp,tp degrees (product = world size); repeat for several layouts. "
                        "Default: 2 ranks: 1,1,2 then 2,1,1; 4 ranks: 2,1,2; else 1,1,world")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--recompute", type=int, default=None, help="block recompute: sub-layers per block")
    parser.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--compile", default=None, help='torch.compile backend, e.g. "aot_eager" or "inductor"')
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    meshes = args.mesh or {2: ["1,1,2", "2,1,1"], 4: ["2,1,2"]}.get(world, [f"1,1,{world}"])
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)] * args.steps  # one batch, learnt
    want = train_single(args, batches)
    ok = True
    try:
        for layout in meshes:
            pp, dp, tp = (int(d) for d in layout.split(","))
            if pp * dp * tp != world:
                raise SystemExit(f"--mesh {layout}: pp * dp * tp must be the world size {world}")
            got = train_parallel(args, pp, dp, tp, batches)
            diff = max(abs(a - b) for a, b in zip(got, want))
            ok &= diff < 1e-4
            if rank == 0:
                fmt = lambda losses: " ".join(f"{x:.5f}" for x in losses)  # noqa: E731
                print(f"pp={pp} dp={dp} tp={tp}: losses {fmt(got)} | single process {fmt(want)} | "
                      f"max |diff| {diff:.1e} {'OK' if diff < 1e-4 else 'MISMATCH'}", flush=True)
    finally:
        dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
