"""A tiny pre-norm transformer LM with hyper-connections, built only from hcext's public
API (``hcext.nn``), for the training-stack tests (tests/test_training_stack.py).

Every attention and MLP sub-layer is a ``HyperConnection(kind=..., branch=...)`` whose
branch carries its own RMSNorm (Pre-Norm inside the branch). The embedding is copied into
n streams (``expand_streams``), the streams are summed at the end (``reduce_streams``) and
a final RMSNorm removes the factor n before the unembedding.

Imported as ``tiny_lm`` (tests/ is on sys.path); also importable by spawned worker
processes (the distributed tests), so it holds the distributed worker too.
"""

import datetime
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hcext  # noqa: F401  (registers torch.ops.hcext.*)
from hcext.nn import HyperConnection, expand_streams, reduce_streams

VOCAB, DIM, HEADS, LAYERS, STREAMS, MAX_LEN = 32, 32, 2, 2, 4, 64


class CausalSelfAttention(nn.Module):
    """Pre-Norm causal self-attention branch ``[B, T, C] -> [B, T, C]``."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """Pre-Norm MLP branch ``[..., C] -> [..., C]``."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """``tokens [B, T] -> logits [B, T, vocab]``. ``checkpointing=True`` wraps every
    sub-layer (hyper-connection + branch) in non-reentrant activation checkpointing."""

    def __init__(self, kind="mhc", vocab=VOCAB, dim=DIM, heads=HEADS, layers=LAYERS, streams=STREAMS,
                 max_len=MAX_LEN, checkpointing=False):
        super().__init__()
        self.streams, self.checkpointing = streams, checkpointing
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        sublayers = []
        for i in range(layers):
            for j, branch in enumerate((CausalSelfAttention(dim, heads), MLP(dim))):
                sublayers.append(HyperConnection(dim, streams, kind=kind, branch=branch, layer_index=2 * i + j))
        self.sublayers = nn.ModuleList(sublayers)
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = expand_streams(h, self.streams)  # [B, T, n, C]
        for hc in self.sublayers:
            x = checkpoint(hc, x, use_reentrant=False) if self.checkpointing else hc(x)
        return self.head(self.norm(reduce_streams(x)))


def lm_loss(logits, tokens):
    """Next-token cross entropy (mean over the predicted positions)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def perturb_(model, scale=0.05, seed=0):
    """Move every hyper-connection parameter away from its Pre-Norm-equivalent init, so that
    the dynamic coefficients differ per token and their gradients are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for hc in model.sublayers:
            for name, p in hc.named_parameters(recurse=False):
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return model


def build(kind="mhc", seed=0, perturb=True, **kw):
    """A deterministic TinyLM: same ``seed`` -> same parameters."""
    torch.manual_seed(seed)
    model = TinyLM(kind=kind, **kw)
    return perturb_(model, seed=seed) if perturb else model


def batch(batch_size=4, seq=16, seed=1, vocab=VOCAB):
    return torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, tokens):
    """``(loss, {name: grad})`` of one forward/backward (grads cloned, model grads cleared)."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(tokens), tokens)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------
# Distributed worker (torch.multiprocessing spawn target: must live in an importable module)


def distributed_worker(rank, world_size, port, kind, tokens, out_dir):
    """Each rank takes its half of the global batch. Runs DDP, then FSDP2 (fully_shard), and
    saves rank 0's loss and full gradients (or FSDP2's error) to ``out_dir/result.pt``."""
    import torch.distributed as dist

    from helpers import run_rank_and_exit

    def init():
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))

    def body():
        result = _ddp_then_fsdp2(kind, tokens.chunk(world_size)[rank])
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        dist.barrier()

    run_rank_and_exit(init, body, dist.destroy_process_group)


def _ddp_then_fsdp2(kind, local):
    from torch.nn.parallel import DistributedDataParallel as DDP

    result = {}
    ddp = DDP(build(kind))
    loss = lm_loss(ddp(local), local)
    loss.backward()
    result["ddp"] = {name: p.grad.detach().clone() for name, p in ddp.module.named_parameters()}

    try:
        from torch.distributed.fsdp import fully_shard

        model = build(kind)
        for hc in model.sublayers:
            fully_shard(hc)
        fully_shard(model)
        loss = lm_loss(model(local), local)
        loss.backward()
        grads, sharded = {}, []
        for name, p in model.named_parameters():
            g = p.grad
            sharded.append(hasattr(g, "full_tensor"))  # a DTensor shard, gathered here
            grads[name] = (g.full_tensor() if sharded[-1] else g).detach().clone()
        result["fsdp"], result["fsdp_sharded"] = grads, all(sharded)
    except Exception as e:  # recorded, so the test can say precisely why FSDP2 did not run
        result["fsdp_error"] = f"{type(e).__name__}: {e}"
    return result
