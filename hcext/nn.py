"""Thin modules over hcext's ops: parameters plus one op call each.

    streams = expand_streams(embedding, n)                 # [..., C] -> [..., n, C]
    for block in blocks:                                   # every attention / MLP sub-layer
        streams = block.hc(streams)                        # HyperConnection(dim, n, branch=...)
    hidden = reduce_streams(streams)                       # or StreamHead(dim, n)(streams)

A :class:`HyperConnection` with a ``branch`` maps streams to streams. Without one,
``hc(x)`` returns ``(branch_input, add_branch_output)`` so that any block can be wrapped
(attention with extra arguments, MoE returning auxiliary losses)::

    branch_input, add = hc(streams)
    out, aux_loss = moe(branch_input)
    streams = add(out)

Between consecutive mHC sub-layers, :class:`HyperConnectionStack` calls the fused boundary
op :func:`hcext.ops.mhc_post_pre` (layer l's merge and layer l+1's coefficients and layer
input in one op) instead of ``stream_mix_expand`` + ``mhc_pre``.

DeepSeek-V4.1's shifted collapse (``collapse="shifted"``, mHC only): sub-layer k's layer
input is collapsed with the *previous* sub-layer's pre, ``y_k = Σ_i π_k[i] x_i`` with
``π_0 = e_0`` and ``π_k = h_pre_{k-1}``; the modules then carry ``(streams, pre)`` from one
sub-layer to the next, and the output is collapsed with the last pre (no learned head)::

    state = expand_streams(embedding, n)                   # bare streams: the first sub-layer uses π_0 = e_0
    for hc in shifted_layers:                              # HyperConnection(..., collapse="shifted")
        state = hc(state)                                  # -> (streams, pre)
    hidden = shifted_collapse(state)                       # Σ_i pre[i] x_i, then the final norm

Recompute (mHC §4.3.2)
----------------------
n streams make the residual state n times larger than a residual network's, and every
sub-layer keeps its input streams ``x_l [..., n, C]`` for backward. mHC's paper drops them:
it keeps ``x_{l0}`` once per block of ``L_r`` consecutive sub-layers plus each sub-layer's
branch output ``F(·)``, and recomputes the streams of the block (without re-running F) in
backward. :class:`HyperConnectionStack` does this with selective activation checkpointing::

    stack = HyperConnectionStack.from_branches(branches, dim, n, recompute_block="auto")
    streams = stack(expand_streams(embedding, n))       # training: blocks of L_r sub-layers

Every block runs under ``torch.utils.checkpoint`` (non-reentrant) with the selective policy
:func:`recompute_policy`: the outputs of the compute-intensive ops (matmuls, attention,
convolutions) and of random ops (dropout) are *saved*; everything else is *recomputed* in
backward: the hcext stream ops (the streams ``x_l``, the layer inputs ``Σ h_pre x_l``, the
coefficients) and the branches' cheap ops (norms, activations, views). So the stored state
is ``x_{l0}`` per block (with the block's first layer input and coefficients, which the
fused boundary op ``mhc_post_pre`` of the previous block computed) and, per sub-layer, the
outputs of its matmuls / attention (the last of which is F's output); no matmul or
attention is re-run. The recomputed ops are the
same ops on the same inputs, so gradients are bitwise equal to those without recompute.
``recompute_block="auto"`` is the paper's ``L_r = round(sqrt(n L / (n + 2)))``: in backward
one block's streams and branch activations are rebuilt at a time, so the peak is what is
stored plus one block's transient state. Recompute applies only in training mode with grad
enabled; it works under ``torch.compile`` (fullgraph too). Measured (benchmarks/bench_memory.py,
24 attention / MLP sub-layers, C = 1024, n = 4, 4096 tokens, fp32 CPU): activation peak of one
forward + backward 0.86x the plain residual network's (1.57x without recompute) and 1.29x the
residual network's under the same policy. Use
:func:`recompute_policy` in your own checkpoint regions (e.g. blocks that a stack cannot
express)::

    from functools import partial
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    out = checkpoint(fn, x, use_reentrant=False,
                     context_fn=partial(create_selective_checkpoint_contexts, recompute_policy))
"""

import functools
import math
import sys
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from . import init as hc_init
from . import ops, reference

__all__ = [
    "HyperConnection",
    "HyperConnectionStack",
    "StreamHead",
    "expand_streams",
    "reduce_streams",
    "shifted_collapse",
    "recompute_policy",
    "make_recompute_policy",
    "recompute_block_size",
    "DEFAULT_SAVE_OPS",
]


def _dtensor_type():
    """DTensor, if torch.distributed.tensor is loaded (no tensor can be one otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _like_streams(t: Tensor, x: Tensor) -> Tensor:
    """A parameter (or a value computed from one) for an op on streams x: when x is a
    DTensor and t a plain tensor (every rank holds all of it), t as a Replicate DTensor on
    x's mesh. Its gradient, Partial where x's tokens are sharded, is then summed over the
    mesh (all-reduce) on its way back to t."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(x, dtensor) or isinstance(t, dtensor):
        return t
    from torch.distributed.tensor import Replicate

    mesh = x.device_mesh
    return dtensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _branch_output_like_streams(f: Tensor, x: Tensor, where: str) -> Tensor:
    """The branch output ``f`` in x's dtype; with DTensor streams, f must be a DTensor too
    (a local tensor's placement is unknown: wrapping it could be silently wrong)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(x, dtensor) and not isinstance(f, dtensor):
        raise TypeError(
            f"{where}: the streams are a DTensor {tuple(x.placements)} but the branch returned a plain "
            f"torch.Tensor of shape {tuple(f.shape)}; return a DTensor, e.g. end the branch with "
            "RowwiseParallel(output_layouts=Shard(1), use_local_output=False) or DTensor.from_local(...)"
        )
    return f.to(x.dtype)


def expand_streams(x: Tensor, num_streams: int) -> Tensor:
    """Network input (HC §2.3): copy the hidden state ``[..., C]`` into n streams ``[..., n, C]``."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], num_streams, x.shape[-1]).contiguous()


def reduce_streams(x: Tensor) -> Tensor:
    """Network output (HC §2.3): the sum of the streams ``[..., n, C] -> [..., C]``.

    With copied-in streams and Pre-Norm-equivalent initialisation every stream carries the
    same hidden state, so the sum is n times the Pre-Norm hidden state: the final norm
    (RMSNorm/LayerNorm before the unembedding) removes that factor.
    """
    return x.sum(-2)


COLLAPSES = ("pre", "shifted")


def _shifted_state(state, where: str) -> Tuple[Tensor, Optional[Tensor]]:
    """``streams`` or ``(streams, pre)`` -> (streams, pre or None)."""
    if isinstance(state, Tensor):
        return state, None
    if isinstance(state, (tuple, list)) and len(state) == 2 and all(isinstance(t, Tensor) for t in state):
        return state[0], state[1]
    raise TypeError(f"{where}: expected streams [..., n, C] or a (streams, pre) tuple, got {type(state).__name__}")


def _initial_pre_mix(x: Tensor) -> Tensor:
    """DeepSeek-V4.1's ``π_0 = e_0`` for streams x: ``[n]`` (shared by every token), one-hot on
    stream 0, in x's compute dtype (``hcext.reference.shifted_initial_pre_mix``)."""
    return _like_streams(reference.shifted_initial_pre_mix(x.shape[-2], ops.compute_dtype(x.dtype), x.device), x)


def shifted_collapse(streams, pre: Optional[Tensor] = None) -> Tensor:
    """The network output of a shifted-collapse (DeepSeek-V4.1) mHC network: the last streams
    collapsed with the last sub-layer's pre, ``Σ_i pre[i] x_i`` ``[..., n, C] -> [..., C]``
    (no learned head; apply the final norm after it).

    Takes what the last ``HyperConnection(..., collapse="shifted")`` or a shifted
    :class:`HyperConnectionStack` returns: ``shifted_collapse((streams, pre))`` or
    ``shifted_collapse(streams, pre)``. ``pre`` is per token ``[..., n]`` or shared ``[n]``.
    At initialisation (``h_pre = 1/n``, equal streams) this is the Pre-Norm hidden state.
    """
    if pre is None:
        if isinstance(streams, Tensor):
            raise TypeError("shifted_collapse: expected (streams, pre) or streams and pre, got streams without pre")
        streams, pre = _shifted_state(streams, "shifted_collapse")
    return ops.stream_aggregate(streams, pre)


def mhc_bias_init(num_streams: int, pre_eps: float = 1e-6) -> Tensor:
    """The mHC bias at which the layer equals a Pre-Norm residual layer (with phi = 0).

    mHC's paper leaves b unspecified (it gives only alpha's initial value, 0.01). With
    phi = 0, any b that makes the h_post entries equal and H_res doubly stochastic keeps
    copied-in (equal) streams equal. hcext chooses: ``h_pre = 1/n`` (so the layer input
    equals the hidden state, not n/2 times it, as b = 0 would give), ``h_post = 2σ(0) = 1``
    (the branch output is added once to every stream), ``b_res = 0`` (uniform, doubly
    stochastic ``H_res``: equal streams stay equal).
    """
    n = num_streams
    p = 1.0 / n - pre_eps
    b_pre = math.log(p / (1.0 - p)) if n > 1 else 20.0  # n = 1: σ(20) ≈ 1
    return torch.cat([torch.full((n,), b_pre), torch.zeros(n), torch.zeros(n * n)])


class HyperConnection(nn.Module):
    """One sub-layer's hyper-connection: ``x' = H_res x + h_post ⊗ branch(Σ_i h_pre[i] x_i)``.

    Args:
        dim: C, the width of each stream.
        num_streams: n (the papers' expansion rate; 4 is their default).
        kind: ``"mhc"`` (DeepSeek's manifold-constrained HC: dynamic coefficients from the
            flattened normed streams, Sinkhorn-projected H_res), ``"hc"`` (the original
            dynamic Hyper-Connections, tanh) or ``"hc_static"`` (static HC: learned
            coefficients shared by every token).
        branch: the wrapped sub-layer ``[..., C] -> [..., C]`` (it should contain its own
            Pre-Norm). Without it, ``forward`` returns ``(branch_input, add_branch_output)``.
        layer_index: the sub-layer's index (used by the HC initialisation).
        sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult: mHC, see
            :func:`hcext.ops.mhc_coeffs` (paper defaults: 20 iterations, 2σ).
        norm, use_tanh, norm_eps: HC, see :func:`hcext.ops.hc_coeffs` (paper default: tanh;
            ``use_tanh=False`` is the paper's best-scoring "w/o tanh" ablation).
        collapse: ``"pre"`` (default, the mHC paper): the layer input is the streams
            collapsed with this sub-layer's own ``h_pre``. ``"shifted"`` (DeepSeek-V4.1, mHC
            only): collapsed with the *previous* sub-layer's ``h_pre`` (``π_0 = e_0`` for
            the first), while ``h_post``, ``H_res`` and this sub-layer's ``h_pre`` still come
            from its own streams (:func:`hcext.ops.mhc_pre_shifted`). The module then takes
            streams (first sub-layer) or ``(streams, pre)`` and returns ``(streams, pre)``:
            ``pre`` is its ``h_pre`` for the next sub-layer's collapse; end the network with
            :func:`shifted_collapse`.

    Initialisation: at init the network equals a Pre-Norm network (up to the 1e-6
    epsilons). mHC: ``phi = 0``, ``alpha = 0.01`` (the paper's), bias from
    :func:`mhc_bias_init`. HC (paper Alg. 2, :mod:`hcext.init`): ``B = 1``,
    ``A_m = e_{layer_index mod n}``, ``A_r = I``, dynamic weights 0, scales 0.01. The
    coefficient parameters are kept in fp32 whatever the module's dtype (they are cast to
    fp32 in ``forward`` if a user casts the model). Static HC parameters should get no
    weight decay (HC §3); dynamic ones do.
    """

    def __init__(
        self,
        dim: int,
        num_streams: int = 4,
        *,
        kind: str = "mhc",
        branch: Optional[nn.Module] = None,
        layer_index: int = 0,
        sinkhorn_iters: int = 20,
        norm_eps: float = 1e-6,
        sinkhorn_eps: float = 1e-6,
        pre_eps: float = 1e-6,
        post_mult: float = 2.0,
        alpha_init: float = 0.01,
        norm: str = "rms",
        use_tanh: bool = True,
        collapse: str = "pre",
    ):
        super().__init__()
        if collapse not in COLLAPSES:
            raise ValueError(f"HyperConnection: collapse must be 'pre' or 'shifted', got {collapse!r}")
        if collapse == "shifted" and kind != "mhc":
            raise ValueError(f"HyperConnection: collapse='shifted' (DeepSeek-V4.1) needs kind='mhc', got {kind!r}")
        self.collapse = collapse
        if kind not in ("mhc", "hc", "hc_static"):
            raise ValueError(f"HyperConnection: kind must be 'mhc', 'hc' or 'hc_static', got {kind!r}")
        if norm not in ("rms", "layer"):
            raise ValueError(f"HyperConnection: norm must be 'rms' or 'layer', got {norm!r}")
        if not 1 <= num_streams <= 32:
            raise ValueError(f"HyperConnection: num_streams must be in [1, 32], got {num_streams}")
        self.dim, self.num_streams, self.kind, self.layer_index = dim, num_streams, kind, layer_index
        self.branch = branch
        self.sinkhorn_iters, self.norm_eps, self.sinkhorn_eps = sinkhorn_iters, norm_eps, sinkhorn_eps
        self.pre_eps, self.post_mult = pre_eps, post_mult
        self.norm, self.use_tanh = norm, use_tanh
        n = num_streams
        if kind == "mhc":
            self.phi = nn.Parameter(torch.zeros(n * dim, n * n + 2 * n))
            self.alpha = nn.Parameter(torch.full((3,), float(alpha_init)))
            self.bias = nn.Parameter(mhc_bias_init(n, pre_eps))
        else:
            params = hc_init.hc_dynamic(n, dim, layer_index) if kind == "hc" else hc_init.hc_static(n, layer_index)
            for name, value in params.items():
                setattr(self, name, nn.Parameter(value))

    def extra_repr(self) -> str:
        shifted = ", collapse='shifted'" if self.collapse == "shifted" else ""
        return (f"dim={self.dim}, num_streams={self.num_streams}, kind={self.kind!r}, "
                f"sinkhorn_iters={self.sinkhorn_iters}{shifted}")

    def prepare(self, x: Tensor) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``x [..., n, C] -> (branch_input [..., C], add_branch_output)``.

        ``collapse="shifted"``: x is the streams (the first sub-layer: ``π_0 = e_0``) or a
        ``(streams, pre)`` state, and ``add_branch_output(f)`` returns ``(streams, pre)``."""
        if self.collapse == "shifted":
            return self._prepare_shifted(x)
        if not isinstance(x, Tensor):
            raise TypeError(
                f"HyperConnection: expected streams [..., n, C], got {type(x).__name__} (a (streams, pre) state is "
                "for collapse='shifted')"
            )
        self._check_streams_shape(x)
        if self.kind == "mhc":
            branch_input, h_post, h_res = ops.mhc_pre(x, *self.mhc_args(x))
        else:
            h_pre, h_post, h_res = self.coefficients(x)
            branch_input = ops.stream_aggregate(x, h_pre)

        def add_branch_output(f: Tensor) -> Tensor:
            return ops.stream_mix_expand(_branch_output_like_streams(f, x, "HyperConnection"), x, h_post, h_res)

        return branch_input, add_branch_output

    def _check_streams_shape(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[-2] != self.num_streams or x.shape[-1] != self.dim:
            raise ValueError(
                f"HyperConnection: expected streams of shape [..., {self.num_streams}, {self.dim}], got {tuple(x.shape)}"
            )

    def _prepare_shifted(self, state) -> Tuple[Tensor, Callable[[Tensor], Tuple[Tensor, Tensor]]]:
        # DeepSeek-V4.1: collapse with the previous sub-layer's pre (π_0 = e_0), pass ours on.
        x, pre_mix = _shifted_state(state, "HyperConnection")
        self._check_streams_shape(x)
        if pre_mix is None:
            pre_mix = _initial_pre_mix(x)
        branch_input, h_post, h_res, next_pre = ops.mhc_pre_shifted(x, pre_mix, *self.mhc_args(x))

        def add_branch_output(f: Tensor) -> Tuple[Tensor, Tensor]:
            f = _branch_output_like_streams(f, x, "HyperConnection")
            return ops.stream_mix_expand(f, x, h_post, h_res), next_pre

        return branch_input, add_branch_output

    def mhc_args(self, x: Tensor) -> tuple:
        """mHC only: ``(phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps,
        post_mult)`` for streams x, the arguments after x of :func:`hcext.ops.mhc_pre` (and
        after ``(f, x, h_post, h_res)`` of :func:`hcext.ops.mhc_post_pre`)."""
        p = self._coefficient_params(x)
        return (p["phi"], p["alpha"], p["bias"], self.sinkhorn_iters, self.norm_eps, self.sinkhorn_eps,
                self.pre_eps, self.post_mult)

    def _coefficient_params(self, x: Tensor) -> dict:
        """The coefficient parameters in the ops' compute dtype: fp32, or fp64 for fp64
        streams (whatever dtype the module was cast to; the cast is differentiable)."""
        dtype = ops.compute_dtype(x.dtype)
        return {name: _like_streams(p.to(dtype), x) for name, p in self.named_parameters(recurse=False)}

    def coefficients(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(h_pre, h_post, h_res)`` for streams x (fp32), e.g. to inspect the mixing matrices."""
        p = self._coefficient_params(x)
        if self.kind == "mhc":
            return ops.mhc_coeffs(
                x, p["phi"], p["alpha"], p["bias"], self.sinkhorn_iters,
                self.norm_eps, self.sinkhorn_eps, self.pre_eps, self.post_mult,
            )
        return ops.hc_coeffs(
            x, p["static_alpha"], p["static_beta"], p.get("dynamic_alpha"), p.get("dynamic_beta"),
            p.get("alpha_scale"), p.get("beta_scale"), p.get("norm_weight"), None, self.norm, self.norm_eps,
            self.use_tanh,
        )

    def forward(self, x: Tensor, *args, **kwargs):
        branch_input, add = self.prepare(x)
        if self.branch is None:
            return branch_input, add
        out = self.branch(branch_input, *args, **kwargs)
        if isinstance(out, tuple):  # (output, *extras), e.g. an MoE's auxiliary loss
            return (add(out[0]), *out[1:])
        return add(out)


class StreamHead(nn.Module):
    """DeepSeek's learned output reduction of the streams (``mhc_head`` in their official code;
    the mHC paper does not define the output reduction, and HC sums the streams):
    ``out = Σ_i w_i x_i`` with ``w = σ(scale · (x̃ @ fn) · rsqrt(mean(x̃²) + eps) + base) + eps``
    computed from the flattened streams ``x̃ [..., n*C]``; then apply the final norm.

    Initialised (fn = 0, base = logit(1/n)) to the mean of the streams.
    """

    def __init__(self, dim: int, num_streams: int = 4, *, norm_eps: float = 1e-6, eps: float = 1e-6):
        super().__init__()
        n = num_streams
        self.dim, self.num_streams, self.norm_eps, self.eps = dim, n, norm_eps, eps
        self.fn = nn.Parameter(torch.zeros(n * dim, n))
        self.scale = nn.Parameter(torch.ones(()))
        p = 1.0 / n - eps
        self.base = nn.Parameter(torch.full((n,), math.log(p / (1 - p)) if n > 1 else 20.0))

    def forward(self, x: Tensor) -> Tensor:
        dtype = ops.compute_dtype(x.dtype)
        xf = x.to(dtype).flatten(-2)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        fn, scale, base = (_like_streams(p.to(dtype), x) for p in (self.fn, self.scale, self.base))
        w = torch.sigmoid(scale * (xf @ fn) * rstd + base) + self.eps
        return ops.stream_aggregate(x, w)


# ---------------------------------------------------------------------------------------
# Block recompute of the stream state (mHC §4.3.2)


def _aten_ops(*names: str) -> Tuple:
    """The aten op packets of these names that this torch has."""
    return tuple(getattr(torch.ops.aten, name) for name in names if hasattr(torch.ops.aten, name))


#: Ops whose outputs :func:`recompute_policy` saves (``CheckpointPolicy.MUST_SAVE``): the
#: compute-intensive ops of the branches (matmuls, attention, convolutions), which are never
#: re-run, and the out-of-place random ops (so that recompute cannot draw other numbers;
#: eager checkpointing also restores the RNG state, which covers in-place ones such as the
#: CPU dropout's ``bernoulli_``: an in-place op must not be saved, its output is mutated).
DEFAULT_SAVE_OPS: Tuple = _aten_ops(
    # matmuls (nn.Linear dispatches addmm / mm; batched ones bmm / baddbmm)
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "_addmm_activation",
    "_int_mm", "_scaled_mm", "_grouped_mm", "_scaled_grouped_mm", "_weight_int4pack_mm", "linear",
    # attention (F.scaled_dot_product_attention's kernels on CPU and CUDA)
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
    "_efficient_attention_forward", "_cudnn_attention_forward",
    # convolutions
    "convolution", "_convolution",
    # random ops
    "native_dropout", "_fused_dropout", "bernoulli", "rand", "rand_like", "randn", "randn_like",
    "randint", "randint_like", "normal", "multinomial", "poisson", "randperm",
)


def make_recompute_policy(save_ops: Optional[Iterable] = None) -> Callable:
    """A selective-checkpoint policy (for ``torch.utils.checkpoint.create_selective_checkpoint_contexts``)
    that saves the outputs of ``save_ops`` (op packets such as ``torch.ops.aten.mm`` or
    overloads such as ``torch.ops.aten.mm.default``; default :data:`DEFAULT_SAVE_OPS`) and
    recomputes every other op, among them all of hcext's ops (``torch.ops.hcext.*``) unless
    listed in ``save_ops``.

    Don't save everything: an op whose saved output is later mutated in place (nn.RMSNorm's
    CPU decomposition adds eps to its ``mean`` in place) makes checkpoint raise "Tensor
    cached during selective activation checkpoint has been mutated".
    """
    ops_ = DEFAULT_SAVE_OPS if save_ops is None else tuple(save_ops)
    packets = frozenset(op for op in ops_ if isinstance(op, torch._ops.OpOverloadPacket))
    overloads = frozenset(op for op in ops_ if not isinstance(op, torch._ops.OpOverloadPacket))

    def policy(ctx, func, *args, **kwargs):
        if func in overloads or getattr(func, "overloadpacket", None) in packets:
            return CheckpointPolicy.MUST_SAVE
        # Everything else, hcext's stream ops (func.namespace == "hcext") among them.
        return CheckpointPolicy.PREFER_RECOMPUTE

    policy.save_ops = ops_
    return policy


#: The default policy of :class:`HyperConnectionStack`, ``recompute_policy(ctx, func, *args,
#: **kwargs)``: save the outputs of :data:`DEFAULT_SAVE_OPS` (matmuls, attention,
#: convolutions, random ops), recompute the rest (hcext's stream ops, norms, activations, views).
recompute_policy = make_recompute_policy()


def recompute_block_size(num_streams: int, num_layers: int) -> int:
    """mHC's L_r (§4.3.2): ``round(sqrt(n L / (n + 2)))``, in ``[1, L]``: about the block size
    that minimises the stored ``n C ceil(L / L_r)`` plus the transient ``(n + 2) C L_r`` per token."""
    if num_layers < 1:
        return 1
    return max(1, min(num_layers, round(math.sqrt(num_streams * num_layers / (num_streams + 2)))))


class HyperConnectionStack(nn.Module):
    """Consecutive hyper-connected sub-layers ``x -> layers[L-1](... layers[0](x))`` on
    streams ``[..., n, C]``, with optional block recompute of the stream state (mHC §4.3.2).

    Args:
        layers: :class:`HyperConnection` modules with a ``branch`` (any kind: ``"mhc"``,
            ``"hc"``, ``"hc_static"``), applied in order; each attention / MLP sub-layer is one.
        recompute_block: ``None`` or ``0``: no recompute; an int L_r: recompute blocks of L_r
            consecutive sub-layers (the last block may be shorter); ``"auto"``: the paper's
            ``L_r = round(sqrt(n L / (n + 2)))`` (:func:`recompute_block_size`).
        save_ops: the ops whose outputs are kept (default :data:`DEFAULT_SAVE_OPS`: matmuls,
            attention, convolutions, random ops); see :func:`make_recompute_policy`.
        policy: a complete selective-checkpoint policy ``(ctx, func, *args, **kwargs) ->
            CheckpointPolicy`` instead (overrides ``save_ops``).
        fuse_boundaries: between two consecutive ``"mhc"`` sub-layers (of one recompute
            block), merge layer l's branch output and compute layer l+1's coefficients and
            layer input in one op, :func:`hcext.ops.mhc_post_pre` (default True). Its
            results equal the unfused ``stream_mix_expand`` + ``mhc_pre`` up to fp32
            rounding (the next layer's RMS statistic is summed in another order).
        collapse: ``"pre"`` or ``"shifted"``, the layers' ``collapse`` (default None: taken
            from the layers, which must agree). ``"shifted"`` is DeepSeek-V4.1's shifted
            collapse (every layer ``kind="mhc"``, ``collapse="shifted"``): the first sub-layer
            collapses its streams with ``π_0 = e_0``, every later one with the previous
            sub-layer's ``h_pre``; fused boundaries use :func:`hcext.ops.mhc_post_pre_shifted`.
            The stack then takes streams or a ``(streams, pre)`` state (to continue a chain,
            e.g. a second stack) and returns ``(streams, pre)``, ``pre`` being the last
            sub-layer's ``h_pre``: finish with :func:`shifted_collapse` (``Σ_i pre[i] x_i``,
            no learned head) and the final norm::

                stack = HyperConnectionStack.from_branches(branches, C, n, collapse="shifted")
                hidden = shifted_collapse(stack(expand_streams(embeddings, n)))

    With recompute (only in training mode with grad enabled), each block runs under
    non-reentrant ``torch.utils.checkpoint`` with the policy. What stays in memory after
    forward is the block's input streams ``x_{l0}`` and, for every sub-layer, the outputs of
    its branch's matmuls / attention (the last one is the branch output ``F(·)``, which the
    paper stores). In backward, the block's streams ``x_l``, the layer inputs
    ``Σ h_pre x_l``, the coefficients and the branches' cheap ops (norms, activations) are
    recomputed; the matmuls and attention are not. Gradients are bitwise equal to those
    without recompute. Note that the policy also drops the branches' own cheap activations
    (e.g. the norm's and the activation function's outputs), so a branch keeps less than it
    does without recompute: compare with a residual network under the same policy. Branches
    may use ``torch.utils.checkpoint`` themselves.

    ``forward(x, *args, **kwargs)`` passes the extra arguments to every layer (e.g. an
    attention mask); every layer must return a tensor (streams).
    """

    def __init__(
        self,
        layers: Iterable[nn.Module],
        recompute_block: Union[None, int, str] = None,
        *,
        save_ops: Optional[Iterable] = None,
        policy: Optional[Callable] = None,
        fuse_boundaries: bool = True,
        collapse: Optional[str] = None,
    ):
        super().__init__()
        self.fuse_boundaries = fuse_boundaries
        self.layers = nn.ModuleList(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, HyperConnection) or layer.branch is None:
                what = ("a HyperConnection without a branch" if isinstance(layer, HyperConnection)
                        else type(layer).__name__)
                raise TypeError(f"HyperConnectionStack: layer {i} must be a HyperConnection with a branch, got {what}")
        shapes = {(layer.num_streams, layer.dim) for layer in self.layers}
        if len(shapes) > 1:
            raise ValueError(f"HyperConnectionStack: layers of different (num_streams, dim): {sorted(shapes)}")
        self.collapse = self._stack_collapse(collapse)
        is_int = isinstance(recompute_block, int) and not isinstance(recompute_block, bool)
        if not (recompute_block is None or recompute_block == "auto" or (is_int and recompute_block >= 0)):
            raise ValueError(
                f"HyperConnectionStack: recompute_block must be None, 'auto' or an int >= 0, got {recompute_block!r}"
            )
        self.recompute_block = recompute_block
        self.policy = policy if policy is not None else (
            recompute_policy if save_ops is None else make_recompute_policy(save_ops)
        )

    @classmethod
    def from_branches(
        cls,
        branches: Iterable[nn.Module],
        dim: int,
        num_streams: int = 4,
        *,
        kind: str = "mhc",
        recompute_block: Union[None, int, str] = "auto",
        save_ops: Optional[Iterable] = None,
        policy: Optional[Callable] = None,
        fuse_boundaries: bool = True,
        collapse: str = "pre",
        **hc_kwargs,
    ) -> "HyperConnectionStack":
        """One ``HyperConnection(dim, num_streams, kind=kind, branch=b, layer_index=i, collapse=collapse,
        **hc_kwargs)`` per branch (attention, MLP, attention, ...), with block recompute (default
        ``"auto"``). ``collapse="shifted"``: DeepSeek-V4.1's shifted collapse (see the class)."""
        layers = [HyperConnection(dim, num_streams, kind=kind, branch=b, layer_index=i, collapse=collapse,
                                  **hc_kwargs)
                  for i, b in enumerate(branches)]
        return cls(layers, recompute_block, save_ops=save_ops, policy=policy, fuse_boundaries=fuse_boundaries,
                   collapse=collapse)

    def _stack_collapse(self, collapse: Optional[str]) -> str:
        """The stack's collapse: the layers' (they must agree), checked against ``collapse``."""
        if collapse is not None and collapse not in COLLAPSES:
            raise ValueError(f"HyperConnectionStack: collapse must be None, 'pre' or 'shifted', got {collapse!r}")
        found = sorted({layer.collapse for layer in self.layers})
        if len(found) > 1 or (collapse is not None and found and found != [collapse]):
            raise ValueError(
                f"HyperConnectionStack: collapse={collapse!r} but the layers have collapse {found}; "
                "give every layer the same collapse (HyperConnection(..., collapse=...))"
            )
        return collapse if collapse is not None else (found[0] if found else "pre")

    @property
    def num_streams(self) -> int:
        return self.layers[0].num_streams if len(self.layers) else 0

    @property
    def block_size(self) -> int:
        """The L_r in use (0: no recompute)."""
        L = len(self.layers)
        if not self.recompute_block or L == 0:
            return 0
        if self.recompute_block == "auto":
            return recompute_block_size(self.num_streams, L)
        return min(int(self.recompute_block), L)

    def blocks(self) -> list:
        """The ``(start, stop)`` layer ranges of the recompute blocks (one block without recompute)."""
        L = len(self.layers)
        L_r = self.block_size or L
        return [(i, min(i + L_r, L)) for i in range(0, L, L_r)] if L else []

    def extra_repr(self) -> str:
        shifted = ", collapse='shifted'" if self.collapse == "shifted" else ""
        return (f"recompute_block={self.recompute_block!r}, block_size={self.block_size}, "
                f"fuse_boundaries={self.fuse_boundaries}{shifted}")

    def recomputing(self) -> bool:
        """Whether ``forward`` recomputes now: a block size, training mode and grad enabled."""
        return bool(self.block_size) and self.training and torch.is_grad_enabled()

    def _run(self, start: int, stop: int, x: Tensor, y, h_post, h_res, *args, **kwargs):
        """Layers [start, stop) on streams x. (y, h_post, h_res): layer start's input and
        coefficients when the boundary op before it (mhc_post_pre) already computed them, else
        None. Returns the streams and the same triple for layer stop: a fused boundary may
        cross a recompute block, so that the ops (and so the bits) are the same with and
        without recompute."""
        pending = (y, h_post, h_res) if y is not None else None
        for i in range(start, stop):
            layer = self.layers[i]
            if not (self.fuse_boundaries and layer.kind == "mhc"):
                x = self._check_streams(i, layer(x, *args, **kwargs))
                continue
            y, h_post, h_res = pending if pending is not None else ops.mhc_pre(x, *layer.mhc_args(x))
            f = _branch_output_like_streams(self._check_streams(i, layer.branch(y, *args, **kwargs)), x,
                                            "HyperConnectionStack")
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if following is not None and following.kind == "mhc":
                x, *next_state = ops.mhc_post_pre(f, x, h_post, h_res, *following.mhc_args(x))
                pending = tuple(next_state)
            else:
                x, pending = ops.stream_mix_expand(f, x, h_post, h_res), None
        return (x, *(pending if pending is not None else (None, None, None)))

    @staticmethod
    def _check_streams(i: int, out) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"HyperConnectionStack: layer {i} returned {type(out).__name__}, not a tensor (streams); wrap "
                "branches with extra outputs yourself, with hcext.nn.recompute_policy in your checkpoint"
            )
        return out

    def _run_shifted(self, start: int, stop: int, x: Tensor, pre: Tensor, y, h_post, h_res, *args, **kwargs):
        """:meth:`_run` for collapse="shifted" (DeepSeek-V4.1). ``pre``: the previous sub-layer's
        h_pre (π_start), or, when (y, h_post, h_res) are given (a fused boundary computed layer
        start's input and coefficients), layer start's own h_pre. Returns (streams, pre, and
        the same triple for layer stop)."""
        pending = (y, h_post, h_res) if y is not None else None
        for i in range(start, stop):
            layer = self.layers[i]
            if not self.fuse_boundaries:
                x, pre = self._check_shifted_state(i, layer((x, pre), *args, **kwargs))
                continue
            if pending is None:  # collapse with π_i = pre_{i-1}; pre becomes pre_i
                y, h_post, h_res, pre = ops.mhc_pre_shifted(x, pre, *layer.mhc_args(x))
            else:
                y, h_post, h_res = pending
            f = _branch_output_like_streams(self._check_streams(i, layer.branch(y, *args, **kwargs)), x,
                                            "HyperConnectionStack")
            if i + 1 < len(self.layers):  # layer i's merge, then layer i+1 collapsed with pre_i
                x, y, h_post, h_res, pre = ops.mhc_post_pre_shifted(
                    f, x, h_post, h_res, pre, *self.layers[i + 1].mhc_args(x)
                )
                pending = (y, h_post, h_res)
            else:
                x, pending = ops.stream_mix_expand(f, x, h_post, h_res), None
        return (x, pre, *(pending if pending is not None else (None, None, None)))

    @staticmethod
    def _check_shifted_state(i: int, out) -> Tuple[Tensor, Tensor]:
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
            raise TypeError(
                f"HyperConnectionStack: layer {i} returned {type(out).__name__}, not a (streams, pre) state; wrap "
                "branches with extra outputs yourself, with hcext.nn.recompute_policy in your checkpoint"
            )
        return out

    def _forward_shifted(self, state, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        x, pre = _shifted_state(state, "HyperConnectionStack")
        if pre is None:
            pre = _initial_pre_mix(x)  # π_0 = e_0
        if not self.recomputing():
            return tuple(self._run_shifted(0, len(self.layers), x, pre, None, None, None, *args, **kwargs)[:2])
        context_fn = functools.partial(create_selective_checkpoint_contexts, self.policy)
        pending = (None, None, None)  # a fused boundary's (layer input, h_post, h_res) for the next block
        for start, stop in self.blocks():
            x, pre, *pending = torch.utils.checkpoint.checkpoint(
                functools.partial(self._run_shifted, start, stop), x, pre, *pending, *args,
                use_reentrant=False, context_fn=context_fn, **kwargs,
            )
        return x, pre

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.collapse == "shifted":  # (streams, pre) in and out
            return self._forward_shifted(x, *args, **kwargs)
        if not self.recomputing():
            return self._run(0, len(self.layers), x, None, None, None, *args, **kwargs)[0]
        context_fn = functools.partial(create_selective_checkpoint_contexts, self.policy)
        state = (None, None, None)  # a fused boundary's (layer input, h_post, h_res) for the next block
        for start, stop in self.blocks():
            x, *state = torch.utils.checkpoint.checkpoint(
                functools.partial(self._run, start, stop), x, *state, *args,
                use_reentrant=False, context_fn=context_fn, **kwargs,
            )
        return x
