"""Training demo: a small byte-level transformer LM with a plain residual, HC and mHC.

    python -m hcext.demo                      # 3-6 minutes on a 2-core CPU, writes ./demo_out
    python -m hcext.demo --device cuda --steps 2000 --dim 256 --layers 8
    python -m hcext.demo --data my_text.txt --variants residual,mhc

The same decoder-only transformer (causal self-attention and MLP sub-layers, each with its
own pre-norm RMSNorm inside the branch; learned positions; tied embeddings) is trained three
ways on the same data, seed, batches and step budget:

- ``residual``: ``x = x + branch(x)``, the Pre-Norm baseline;
- ``hc``: dynamic Hyper-Connections (HC, arXiv 2409.19606, tanh, n streams);
- ``mhc``: manifold-constrained Hyper-Connections (mHC, arXiv 2512.24880, n streams);
- ``mhc_shifted`` (not in the default list; ``--variants residual,hc,mhc,mhc_shifted``):
  mHC with DeepSeek-V4.1's shifted collapse (``HyperConnection(kind="mhc",
  collapse="shifted")``): each sub-layer's input is its streams collapsed with the previous
  sub-layer's h_pre (the first: stream 0), and the output is the last streams collapsed with
  the last h_pre (``hcext.nn.shifted_collapse``) instead of their sum.

HC and mHC use hcext's public API the way a user would: ``expand_streams`` copies the
embedding into n streams, one ``HyperConnection`` wraps every attention / MLP branch, and
``reduce_streams`` sums the streams before the final norm. Both connections start out
equal to the Pre-Norm network and consume no random numbers, so the three variants start
from the same weights and the same function.

Data: by default ``hcext/data/corpus.txt.gz``, a frozen ~330 KB (uncompressed) snapshot of
this project's own docs and sources, shipped gzipped inside the package, so every install
of one hcext version trains on the same bytes. Tokens are bytes (vocabulary 256). The last
10% of the bytes are the validation split. ``--data PATH`` trains on any file instead (read
as bytes; a ``.gz`` file is decompressed first).

Output: a table (final train and validation loss, tokens/s, peak memory), ``metrics.json``
and, when matplotlib is installed, ``loss.png`` (loss curves) and ``amax_gain.png``: the
mHC paper's stability picture, the "Amax gain magnitude" of the composite residual mapping
``H_res^(l) ... H_res^(1)`` (max |row sum| = forward gain, max |column sum| = backward gain,
averaged over the tokens of a held-out batch) per sub-layer, for HC and mHC.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the variant's run. On the
CPU, the growth of the process's peak resident set size (VmHWM, reset before each variant
through /proc/self/clear_refs; ``ru_maxrss`` where that is unavailable) over the resident
size at the variant's start. The allocator-independent ``activation MiB`` column counts the
bytes that autograd saves for backward in one training step (parameters excluded).

CPU threads: one by default (``--threads``): the model is small, and with OpenMP's
spin-waiting two threads ran several times slower than one on a 2-core machine whose
cores were shared with other work.
"""

import argparse
import ctypes
import datetime
import gc
import gzip
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover
    resource = None

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hcext
from hcext import ops
from hcext.nn import HyperConnection, expand_streams, reduce_streams, shifted_collapse

__all__ = ["main", "build_model", "amax_gains", "residual_matrices", "plot"]

VARIANTS = ("residual", "hc", "mhc")  # the default run
OPTIONAL_VARIANTS = ("mhc_shifted",)  # selectable with --variants
ALL_VARIANTS = VARIANTS + OPTIONAL_VARIANTS
# Stored gzipped so that the snapshot of the sources does not show up in greps of the tree.
DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt.gz"
VAL_FRACTION = 0.1
VOCAB = 256  # byte-level


# ---------------------------------------------------------------------------------------
# data


def read_data(path: Path) -> bytes:
    """The training bytes of ``path``; a ``.gz`` file (the bundled corpus) is decompressed."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def load_bytes(path: Path) -> Tensor:
    return as_tokens(read_data(path))


def as_tokens(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split_data(data: Tensor, val_fraction: float = VAL_FRACTION):
    """Deterministic split: the last ``val_fraction`` of the bytes are the validation set."""
    n_val = max(int(len(data) * val_fraction), 1)
    return data[:-n_val], data[-n_val:]


def random_batch(data: Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """``batch_size`` random windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    win = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return win[:, :-1], win[:, 1:]


def fixed_batches(data: Tensor, batch_size: int, seq_len: int, num_batches: int):
    """Evenly spaced windows over ``data``: the same evaluation batches for every variant."""
    total = batch_size * num_batches
    last = len(data) - seq_len - 1
    starts = torch.linspace(0, last, total).long().tolist()
    win = torch.stack([data[s : s + seq_len + 1] for s in starts])
    return [(w[:, :-1], w[:, 1:]) for w in win.split(batch_size)]


# ---------------------------------------------------------------------------------------
# model


class Attention(nn.Module):
    """Pre-norm causal self-attention branch: ``[..., T, C] -> [..., T, C]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """Pre-norm MLP branch (4x, GELU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.fc(self.norm(x))))


class Residual(nn.Module):
    """The baseline connection: ``x + branch(x)``."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def make_connection(variant: str, dim: int, num_streams: int, branch: nn.Module, layer_index: int) -> nn.Module:
    if variant == "residual":
        return Residual(branch)
    if variant in ("hc", "mhc"):  # dynamic HC (tanh) / mHC, each initialised to equal Pre-Norm
        return HyperConnection(dim, num_streams, kind=variant, branch=branch, layer_index=layer_index)
    if variant == "mhc_shifted":  # DeepSeek-V4.1: collapse with the previous sub-layer's h_pre
        return HyperConnection(dim, num_streams, kind="mhc", collapse="shifted", branch=branch,
                               layer_index=layer_index)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(ALL_VARIANTS)}")


def connection_name(variant: str) -> str:
    """How the variant connects its sub-layers (metrics.json's ``connection``)."""
    if variant == "residual":
        return "x + branch(x)"
    if variant == "mhc_shifted":
        return "hcext.nn.HyperConnection(kind='mhc', collapse='shifted')"
    return f"hcext.nn.HyperConnection(kind={variant!r})"


class TinyLM(nn.Module):
    """Decoder-only byte LM. ``variant`` picks the connection around every sub-layer."""

    def __init__(self, variant: str, dim: int, layers: int, heads: int, seq_len: int, num_streams: int):
        super().__init__()
        self.variant, self.num_streams = variant, num_streams
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(seq_len, dim)
        branches = []
        for _ in range(layers):
            branches += [Attention(dim, heads), MLP(dim)]
        # GPT-2 init, the same for every variant: N(0, 0.02), output projections / sqrt(2 layers).
        for m in [self.embed, self.pos, *branches]:
            for name, p in m.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * layers) if name.endswith("out.weight") else 0.02
                    nn.init.normal_(p, std=std)
        # Connections are created after every random draw: the three variants get equal weights.
        self.sublayers = nn.ModuleList(
            make_connection(variant, dim, num_streams, b, k) for k, b in enumerate(branches)
        )
        self.norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        if self.variant == "residual":
            for layer in self.sublayers:
                h = layer(h)
        elif self.variant == "mhc_shifted":
            state = expand_streams(h, self.num_streams)  # the first sub-layer collapses with e_0
            for layer in self.sublayers:
                state = layer(state)  # (streams, pre)
            h = shifted_collapse(state)  # Σ_i pre[i] x_i with the last sub-layer's pre
        else:
            x = expand_streams(h, self.num_streams)  # [B, T, n, C]
            for layer in self.sublayers:
                x = layer(x)
            h = reduce_streams(x)  # the final norm removes the factor n
        return self.norm(h) @ self.embed.weight.t()  # tied unembedding


def build_model(variant: str, cfg: argparse.Namespace) -> TinyLM:
    torch.manual_seed(cfg.seed)
    return TinyLM(variant, cfg.dim, cfg.layers, cfg.heads, cfg.seq_len, cfg.streams)


def param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on matrices (dynamic HC/mHC weights included, as in HC §3); none on norms,
    scales, biases and HC's static ``[A_m | A_r]`` (HC: static parameters get no decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("static_alpha") else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


# ---------------------------------------------------------------------------------------
# the stability metric


def connection_h_res(conn: HyperConnection, x: Tensor) -> Tensor:
    """``H_res [..., n, n]`` of one hyper-connection at streams ``x``, from its parameters."""
    if conn.kind == "mhc":
        _, _, h_res = ops.mhc_coeffs(
            x, conn.phi.float(), conn.alpha.float(), conn.bias.float(), conn.sinkhorn_iters,
            conn.norm_eps, conn.sinkhorn_eps, conn.pre_eps, conn.post_mult,
        )
        return h_res
    return conn.coefficients(x)[2]  # HC: hcext.ops.hc_coeffs on the module's parameters


@torch.no_grad()
def residual_matrices(model: TinyLM, idx: Tensor) -> List[Tensor]:
    """Per sub-layer ``H_res`` for every token of ``idx``: ``[tokens, n, n]`` each, computed
    at the streams that reach the sub-layer in a forward pass."""
    inputs: List[Tensor] = []
    def keep(_m, args):  # streams, or a shifted sub-layer's (streams, pre)
        inputs.append(args[0][0] if isinstance(args[0], tuple) else args[0])

    hooks = [m.register_forward_pre_hook(keep) for m in model.sublayers]
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    n = model.num_streams
    return [connection_h_res(m, x).reshape(-1, n, n) for m, x in zip(model.sublayers, inputs)]


def amax_gains(mats: Sequence[Tensor]) -> Dict[str, List[float]]:
    """mHC's "Amax gain magnitude": for the composite ``P_l = H_l ... H_1`` (and for each single
    ``H_l``), the max over rows of |row sum| (forward gain) and the max over columns of
    |column sum| (backward gain), averaged over tokens. Computed in fp64."""
    out = {"forward": [], "backward": [], "single_forward": [], "single_backward": []}
    P = None
    for H in mats:
        H = H.double()
        P = H if P is None else H @ P
        for key, M in (("", P), ("single_", H)):
            out[key + "forward"].append(M.sum(-1).abs().amax(-1).mean().item())
            out[key + "backward"].append(M.sum(-2).abs().amax(-1).mean().item())
    return out


# ---------------------------------------------------------------------------------------
# measuring


def _libc_trim() -> None:
    # Hand freed heap pages back to the OS, so that the next variant's RSS growth is its own.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb() -> int:
    if resource is None:
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of a block of work, in MiB (see the module docstring for what it is)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.kind = "torch.cuda.max_memory_allocated growth"
            return self
        _libc_trim()
        self.base = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (Linux >= 4.0)
            self.kind = "peak RSS growth (VmHWM)"
        except OSError:
            self.base = _maxrss_kb()
            self.kind = "ru_maxrss growth"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.kind.startswith("peak RSS"):
            self.mib = max((_status_kb("VmHWM") or 0) - (self.base or 0), 0) / 1024
        else:
            self.mib = max(_maxrss_kb() - self.base, 0) / 1024
        return False


def saved_activation_bytes(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Bytes autograd saves for backward in one forward pass (unique storages, parameters
    excluded); runs the backward too, so that the graph is freed. Leaves gradients zeroed."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


class Progress:
    """One updating line: tqdm when installed, else a ``\\r`` line on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None
        self.last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=f"{desc:>8}", leave=True, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.update(1)  # redraws, with this step's postfix
            return
        now = time.perf_counter()
        if now - self.last < 0.25 and step < self.total:
            return
        self.last = now
        width = 24
        filled = int(width * step / self.total)
        line = (f"{self.desc:>8} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
                f"loss {loss:.3f}  {tok_s:,.0f} tok/s")
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line)
        elif step == self.total or step % max(self.total // 10, 1) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------
# training


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return total / len(batches)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(variants: Sequence[str], cfg, train: Tensor, device: torch.device) -> None:
    """One step of a tiny model of every variant, so that one-time costs (kernel and thread
    pool set-up, lazy initialisation) are not counted in the first variant's time and memory."""
    tiny = argparse.Namespace(**{**vars(cfg), "dim": 16, "heads": 1, "layers": 1, "seq_len": 8})
    for v in variants:
        model = build_model(v, tiny).to(device)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
        x, y = random_batch(train, 2, 8, torch.Generator().manual_seed(0))
        F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten()).backward()
        opt.step()
        evaluate(model, [(x, y)], device)
    _sync(device)


def train_variant(variant: str, cfg, train: Tensor, val_batches, amax_batch, device: torch.device) -> dict:
    with PeakMemory(device) as mem:
        model = build_model(variant, cfg).to(device)
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(cfg.seed)  # the same batches for every variant
        x0, y0 = random_batch(train, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + 1))
        act_bytes = saved_activation_bytes(model, x0.to(device), y0.to(device))

        rec = dict(steps=[], train_loss=[], grad_norm=[], val_steps=[0], val_loss=[evaluate(model, val_batches, device)])
        tokens_per_step = cfg.batch_size * cfg.seq_len
        train_time = 0.0
        bar = Progress(cfg.steps, variant, not cfg.quiet)
        for step in range(1, cfg.steps + 1):
            x, y = random_batch(train, cfg.batch_size, cfg.seq_len, gen)
            x, y = x.to(device), y.to(device)
            _sync(device)
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step - 1, cfg)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_v = loss.item()  # synchronises
            train_time += time.perf_counter() - t0
            rec["steps"].append(step)
            rec["train_loss"].append(loss_v)
            rec["grad_norm"].append(float(gnorm))
            if not math.isfinite(loss_v):
                break
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec["val_steps"].append(step)
                rec["val_loss"].append(evaluate(model, val_batches, device))
            bar.update(step, loss_v, tokens_per_step * step / train_time)
        bar.close()

    tail = rec["train_loss"][-min(10, len(rec["train_loss"])):]
    rec.update(
        params=sum(p.numel() for p in model.parameters()),
        final_train_loss=sum(tail) / len(tail),
        final_val_loss=rec["val_loss"][-1],
        tokens_per_s=tokens_per_step * len(rec["steps"]) / train_time,
        train_time_s=train_time,
        peak_memory_mib=mem.mib,
        peak_memory_kind=mem.kind,
        saved_activations_mib=act_bytes / 2**20,
        connection=connection_name(variant),
        amax_gain=None,
    )
    if variant != "residual":
        model.eval()
        rec["amax_gain"] = amax_gains(residual_matrices(model, amax_batch.to(device)))
    return rec


# ---------------------------------------------------------------------------------------
# output


def format_table(metrics: dict) -> str:
    rows = [("variant", "params", "train loss", "val loss", "tokens/s", "peak MiB", "activation MiB")]
    for name, r in metrics["variants"].items():
        rows.append((name, f"{r['params']:,}", f"{r['final_train_loss']:.4f}", f"{r['final_val_loss']:.4f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['peak_memory_mib']:.1f}", f"{r['saved_activations_mib']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    kinds = {r["peak_memory_kind"] for r in metrics["variants"].values()}
    lines += ["", "train loss: mean of the last 10 steps; val loss: held-out last 10% of the data, end of training.",
              f"peak MiB: {', '.join(sorted(kinds))}; activation MiB: bytes saved for backward in one step."]
    return "\n".join(lines)


def _smooth(values: List[float], k: int) -> List[float]:
    out, acc = [], None
    a = 2.0 / (k + 1)
    for v in values:
        acc = v if acc is None else a * v + (1 - a) * acc
        out.append(acc)
    return out


COLORS = {"residual": "tab:gray", "hc": "tab:orange", "mhc": "tab:blue", "mhc_shifted": "tab:green"}


def plot(metrics: dict, out_dir: Path) -> List[Path]:
    """Write ``loss.png`` and ``amax_gain.png``; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    variants = metrics["variants"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in variants.items():
        c = COLORS.get(name)
        ax.plot(r["steps"], r["train_loss"], color=c, alpha=0.2, lw=0.8)
        ax.plot(r["steps"], _smooth(r["train_loss"], 10), color=c, lw=1.5, label=f"{name} train (EMA)")
        ax.plot(r["val_steps"], r["val_loss"], "o--", color=c, ms=3, lw=1, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("Byte-level LM: residual vs HC vs mHC")
    losses = [v for r in variants.values() for v in r["train_loss"] + r["val_loss"] if math.isfinite(v)]
    if losses:
        lo, hi = min(losses), max(losses)
        ax.set_ylim(lo - 0.05 * (hi - lo), min(hi, lo + 1.5 * (sorted(losses)[len(losses) // 2] - lo) + 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    gains = {k: r["amax_gain"] for k, r in variants.items() if r.get("amax_gain")}
    if gains:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, which, title in ((axes[0], "forward", "forward gain (max |row sum|)"),
                                 (axes[1], "backward", "backward gain (max |column sum|)")):
            for name, g in gains.items():
                layers = list(range(1, len(g[which]) + 1))
                c = COLORS.get(name)
                ax.plot(layers, g[which], "o-", color=c, label=f"{name} composite")
                ax.plot(layers, g["single_" + which], "x:", color=c, alpha=0.7, label=f"{name} single layer")
            ax.axhline(1.0, color="k", lw=0.6, alpha=0.5)
            ax.set_yscale("log")
            ax.set_xlabel("sub-layer l (attention and MLP counted separately)")
            ax.set_title(title)
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("Amax gain magnitude (mean over tokens)")
        axes[0].legend(fontsize=8)
        fig.suptitle("Composite residual mapping H_res^(l)...H_res^(1), held-out batch")
        fig.tight_layout()
        written.append(out_dir / "amax_gain.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------
# command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hcext.demo",
        description="Train a small byte-level transformer LM with a plain residual, HC and mHC; "
        "print a table, write metrics.json and plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ",".join(ALL_VARIANTS))
    p.add_argument("--data", type=Path, default=None,
                   help="a text file to train on, .gz decompressed (default: the bundled corpus)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--layers", type=int, default=4, help="transformer layers (each has an attention and an MLP sub-layer)")
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: dim // 32, at least 1)")
    p.add_argument("--streams", type=int, default=4, help="n, the number of residual streams of HC and mHC")
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: steps // 10)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0 = torch's default. One thread is the default because this model is "
                   "small and OpenMP's spin-waiting makes 2+ threads many times slower when the cores are shared")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--plot-from", type=Path, default=None, metavar="METRICS_JSON",
                   help="only redraw the plots of an earlier run's metrics.json (into its folder)")
    cfg = p.parse_args(argv)
    cfg.variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    bad = [v for v in cfg.variants if v not in ALL_VARIANTS]
    if bad or not cfg.variants:
        p.error(f"--variants: unknown {bad}; choose from {','.join(ALL_VARIANTS)}")
    cfg.heads = cfg.heads or max(cfg.dim // 32, 1)
    if cfg.dim % cfg.heads:
        p.error(f"--dim {cfg.dim} is not divisible by --heads {cfg.heads}")
    if min(cfg.steps, cfg.layers, cfg.dim, cfg.streams, cfg.seq_len, cfg.batch_size) < 1:
        p.error("--steps, --layers, --dim, --streams, --seq-len and --batch-size must be >= 1")
    cfg.warmup = cfg.warmup if cfg.warmup is not None else max(cfg.steps // 10, 1)
    cfg.eval_every = cfg.eval_every or max(cfg.steps // 10, 1)
    return cfg


def _write_plots(metrics: dict, out_dir: Path) -> None:
    try:
        written = plot(metrics, out_dir)
    except ImportError:
        print("plots skipped: matplotlib is not installed (`pip install matplotlib`, then "
              f"`python -m hcext.demo --plot-from {out_dir / 'metrics.json'}`)")
        return
    print("plots:", ", ".join(str(p) for p in written))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_args(argv)
    if cfg.plot_from is not None:
        metrics = json.loads(cfg.plot_from.read_text())
        _write_plots(metrics, cfg.plot_from.parent)
        return metrics
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    path = cfg.data or DEFAULT_CORPUS
    raw = read_data(path)
    data = as_tokens(raw)
    train, val = split_data(data)
    if len(val) < cfg.seq_len + 2 or len(train) < cfg.seq_len + 2:
        raise SystemExit(f"{path}: {len(data)} bytes is too short for --seq-len {cfg.seq_len}")
    val_batches = fixed_batches(val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    amax_batch = val_batches[0][0]

    cfg.out.mkdir(parents=True, exist_ok=True)
    print(f"hcext demo: {', '.join(cfg.variants)} | {cfg.layers} layers x dim {cfg.dim} ({cfg.heads} heads), "
          f"n={cfg.streams}, seq {cfg.seq_len}, batch {cfg.batch_size}, {cfg.steps} steps, "
          f"{device}, {torch.get_num_threads()} threads")
    print(f"data: {path} ({len(train):,} train / {len(val):,} val bytes)")

    warm_up(cfg.variants, cfg, train, device)
    started = time.perf_counter()
    variants = {}
    for v in cfg.variants:
        variants[v] = train_variant(v, cfg, train, val_batches, amax_batch, device)
    total = time.perf_counter() - started

    metrics = dict(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items() if k != "plot_from"},
        data=dict(path=str(path), bundled=cfg.data is None, bytes=len(data), train_bytes=len(train),
                  val_bytes=len(val), val_fraction=VAL_FRACTION, sha256=hashlib.sha256(raw).hexdigest()),
        env=dict(date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
                 torch=torch.__version__, hcext=hcext.__version__, platform=platform.platform(),
                 processor=_cpu_model(), cpu_count=os.cpu_count(),
                 threads=torch.get_num_threads(),
                 device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        total_time_s=total,
        variants=variants,
    )
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print()
    print(format_table(metrics))
    print(f"\ntotal {total:.0f} s; metrics: {cfg.out / 'metrics.json'}")
    _write_plots(metrics, cfg.out)
    return metrics


if __name__ == "__main__":
    main()
