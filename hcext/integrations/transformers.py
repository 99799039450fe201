"""hcext's kernels for DeepSeek-V4's mHC in Hugging Face ``transformers`` (tested: 5.23.0).

``transformers.models.deepseek_v4`` implements mHC in plain PyTorch in three places:
``DeepseekV4HyperConnection`` (the coefficients and the collapse of the streams into the
sub-layer input), the residual merge written inline in ``DeepseekV4DecoderLayer.forward``, and
``DeepseekV4HyperHead`` (the pre-only collapse before the final norm).
:func:`apply_to_deepseek_v4` runs all three on hcext's fused ops, in the style of Liger-Kernel's
``apply_liger_kernel_to_*``::

    from hcext.integrations.transformers import apply_to_deepseek_v4
    apply_to_deepseek_v4(model)   # this model, in place
    apply_to_deepseek_v4()        # or: every DeepSeek-V4 model built from now on

Every parameter keeps its name, shape, dtype and values, so the state_dict is unchanged and
``from_pretrained`` checkpoints load as before (``_keep_in_fp32_modules_strict`` still keeps
the mHC parameters fp32). :func:`revert_deepseek_v4` undoes either form.

Convention mapping (transformers -> hcext op arguments)
------------------------------------------------------

One ``DeepseekV4HyperConnection`` (n = ``hc_mult`` streams of width C = ``hidden_size``):

* ``fn [(2+n)·n, n·C]``, one row per coefficient, rows ``[pre n | post n | comb n²]``, the comb
  rows ``comb[src, dst]`` row-major  ->  ``phi = fnᵀ [n·C, n²+2n]`` (one column per coefficient)
  with the res columns permuted ``[src, dst] -> [dst, src]`` (``hcext.convert._swap_res_block``,
  the same mapping as for TileKernels' ``fn``).
* ``scale [3]`` -> ``alpha = (α_pre, α_post, α_res)``, as is.
* ``base [(2+n)·n]`` -> ``bias``, the res block permuted like phi's columns.
* ``input_norm`` (unweighted RMSNorm over the n·C flattened streams, eps ``rms_norm_eps``) ->
  ``norm_eps = rms_norm_eps`` (hcext applies the norm after the projection, Eq. 14-15).
* ``pre = σ(·) + hc_eps`` -> ``pre_eps = hc_eps``; ``post = 2·σ(·)`` -> ``post_mult = 2.0``.
* ``comb = softmax over dst + hc_eps``, normalise over src, then ``hc_sinkhorn_iters - 1`` times
  (dst, src), ``+ hc_eps`` in every denominator -> ``sinkhorn_iters = hc_sinkhorn_iters``,
  ``sinkhorn_eps = hc_eps``: hcext's Sinkhorn on ``H_res[dst, src] = comb[src, dst]`` (softmax
  over dst, then rows / columns alternately, ending on src) is the same sequence of steps.
* The merge ``post ⊗ f + comb.T @ x`` (comb applied transposed: ``out[dst] = Σ_src
  comb[src, dst] x[src]``) -> ``stream_mix_expand(f, x, h_post, H_res)``.
* ``DeepseekV4HyperHead`` (``hc_fn [n, n·C]``, ``hc_scale [1]``, ``hc_base [n]``, ``eps =
  hc_eps``, norm eps ``rms_norm_eps``) -> ``mhc_pre`` with ``phi = [hc_fnᵀ | 0]``, ``alpha =
  (hc_scale, 0, 0)``, ``bias = (hc_base, 0)``, ``pre_eps = hc_eps``; its layer input is the
  head's collapse.

What runs where
---------------

* ``DeepseekV4HyperConnection.forward(x)`` -> ``hcext.ops.mhc_pre``. It returns what the
  original returns, ``(post [..., n] fp32, comb [..., n, n] fp32 indexed [src, dst],
  collapsed [..., C] in x's dtype)``: ``comb`` is a transposed view of hcext's ``H_res``.
  It also takes the previous sub-layer's merge: ``forward(x, branch_output, post, comb)``
  (with the previous module's ``post`` and ``comb``) returns ``(post, comb, collapsed,
  merged)`` from one ``hcext.ops.mhc_post_pre``, ``merged`` being transformers'
  ``post ⊗ branch_output + comb.T @ x``.
* ``DeepseekV4DecoderLayer.forward``: ``attn_hc(x)`` (``mhc_pre``), attention, then
  ``ffn_hc(x, attn_output, post, comb)``, the attention/MLP boundary fused into one
  ``mhc_post_pre`` (the attention's merge and the MLP's coefficients and input), the MLP, and
  the MLP's merge as ``hcext.ops.stream_mix_expand``.

  The boundary *between* decoder layers (layer l's MLP merge and layer l+1's ``attn_hc``) is
  not fused: ``DeepseekV4Model.forward`` calls each layer on a tensor of streams and expects
  one back, and gradient checkpointing (one checkpoint per layer, on its positional tensor
  input), ``output_hidden_states`` (a hook on each layer's output), pipeline-parallel plans and
  FSDP's per-layer wrapping all rely on that. Fusing it would mean returning the unmerged
  ``(f, x, post, comb)`` from a layer, i.e. rewriting the model's loop, so that boundary
  runs ``stream_mix_expand`` then ``mhc_pre``: one of the two boundaries per layer is fused.
* ``DeepseekV4HyperHead.forward`` -> ``hcext.ops.mhc_pre`` with zero post/res columns (their
  coefficients, n² + n extra columns of one n·C projection and a 1-step n×n Sinkhorn per
  token, are discarded; negligible beside the LM head). One pass over the streams; its
  backward sums x's gradient in fp32.

Numerics
--------

* fp32 model: equal to transformers' code up to fp32 rounding order (loss, logits and every
  gradient within the test suite's fp32 tolerance).
* bf16 / fp16 model (streams in bf16, mHC parameters fp32 as ``from_pretrained`` keeps them,
  or bf16 after ``model.to(bf16)``: they are cast to fp32 on use, as transformers does):
  hcext keeps the coefficients in fp32 and does the merge in fp32, rounding the merged
  streams to bf16 once, where transformers rounds ``post`` and ``comb`` to bf16 first and
  merges in bf16 (``post.to(dtype) * f + comb.to(dtype).T @ x``). So results differ from
  transformers' by those roundings and are closer to an fp64 run.
* fp64 model: hcext computes the coefficients in fp64; transformers' ``.float()`` computes them
  in fp32.
* ``torch.autocast`` does not reach into hcext's ops: the coefficient math stays fp32, where
  transformers' ``F.linear`` in the coefficient projection would run in bf16.
* The branch outputs are cast to the streams' dtype before the merge (transformers would
  promote the streams instead if a branch returned a wider dtype).

Works with ``model.gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()`` (the
patched layer keeps transformers' checkpointing wrapper), ``torch.compile`` of the decoder layers
(the mHC parts trace into hcext's custom ops with no graph break; with transformers' default
``grouped_mm`` experts a whole decoder layer compiles with ``fullgraph=True``; with
``experts_implementation="eager"`` the experts' ``nonzero`` loop breaks the graph, as it does
without hcext) and FSDP2 (``fully_shard`` per decoder layer; patch before sharding).

Supported: transformers 5.23.x (another version raises :class:`UnsupportedTransformersError`;
the modules' attributes and parameter shapes are checked when patching), ``1 <= hc_mult <= 32``,
``hc_sinkhorn_iters >= 1``, finite ``hc_eps >= 0`` and ``rms_norm_eps >= 0``; other settings
raise ``ValueError`` naming the setting.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..convert import _swap_res_block

__all__ = [
    "apply_to_deepseek_v4",
    "revert_deepseek_v4",
    "is_patched",
    "UnsupportedTransformersError",
    "SUPPORTED_TRANSFORMERS",
]

logger = logging.getLogger(__name__)

#: transformers versions (major, minor) whose DeepSeek-V4 modeling code this module mirrors.
SUPPORTED_TRANSFORMERS = ((5, 23),)

_HC, _LAYER, _HEAD = "DeepseekV4HyperConnection", "DeepseekV4DecoderLayer", "DeepseekV4HyperHead"
_NAMES = (_HC, _LAYER, _HEAD)


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is not a version (or lacks the DeepSeek-V4 code) that
    :func:`apply_to_deepseek_v4` supports."""


# ---------------------------------------------------------------------------------------
# version and config checks


def _modeling():
    """transformers' ``modeling_deepseek_v4`` module, after checking the version."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "hcext.integrations.transformers needs transformers (pip install 'transformers==5.23.0', "
            "or pip install 'hcext[transformers]')"
        ) from e
    version = transformers.__version__
    release = _release(version)
    if release[:2] not in SUPPORTED_TRANSFORMERS:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_TRANSFORMERS)
        raise UnsupportedTransformersError(
            f"apply_to_deepseek_v4 supports transformers {supported} (its DeepSeek-V4 modeling code is what hcext "
            f"replaces); found transformers {version}. Install transformers==5.23.0 or run the model unpatched."
        )
    try:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as modeling
    except ImportError as e:
        raise UnsupportedTransformersError(
            f"transformers {version} has no importable transformers.models.deepseek_v4.modeling_deepseek_v4: {e}"
        ) from e
    missing = [name for name in _NAMES if not isinstance(getattr(modeling, name, None), type)]
    if missing:
        raise UnsupportedTransformersError(
            f"transformers {version}: modeling_deepseek_v4 lacks {', '.join(missing)}; apply_to_deepseek_v4 "
            f"cannot patch it"
        )
    return modeling


def _release(version: str):
    try:
        from packaging.version import Version

        return Version(version).release
    except Exception:  # an unparsable version string: not a supported one
        return ()


def check_config(config) -> None:
    """Raises ``ValueError`` naming the setting when a DeepSeek-V4 config has mHC settings
    that hcext's kernels cannot run exactly as transformers does."""
    n = getattr(config, "hc_mult", None)
    iters = getattr(config, "hc_sinkhorn_iters", None)
    hc_eps = getattr(config, "hc_eps", None)
    norm_eps = getattr(config, "rms_norm_eps", None)
    _check_settings(n, iters, hc_eps, norm_eps, where="config")


def _check_settings(n, iters, hc_eps, norm_eps, where: str) -> None:
    if not isinstance(n, int) or not 1 <= n <= ops._checks.MAX_N:
        raise ValueError(
            f"apply_to_deepseek_v4: {where}.hc_mult = {n!r} is not supported: hcext's kernels take "
            f"1 <= hc_mult <= {ops._checks.MAX_N} streams"
        )
    if not isinstance(iters, int) or not 1 <= iters <= ops._checks.MAX_ITERS:
        raise ValueError(
            f"apply_to_deepseek_v4: {where}.hc_sinkhorn_iters = {iters!r} is not supported: hcext's Sinkhorn takes "
            f"1 <= hc_sinkhorn_iters <= {ops._checks.MAX_ITERS}"
        )
    for name, value in (("hc_eps", hc_eps), ("rms_norm_eps", norm_eps)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"apply_to_deepseek_v4: {where}.{name} = {value!r} is not supported: hcext needs a finite "
                f"epsilon >= 0"
            )


def _check_hc_module(m: nn.Module, name: str) -> None:
    n = getattr(m, "hc_mult", None)
    _check_settings(n, getattr(m, "hc_sinkhorn_iters", None), getattr(m, "hc_eps", None),
                    getattr(getattr(m, "input_norm", None), "eps", None), where=name or "module")
    C_n = m.fn.shape[1] if m.fn.dim() == 2 else -1
    if tuple(m.fn.shape) != ((2 + n) * n, C_n) or C_n % n or tuple(m.base.shape) != ((2 + n) * n,) \
            or tuple(m.scale.shape) != (3,):
        raise ValueError(
            f"apply_to_deepseek_v4: {name}: unexpected mHC parameter shapes fn {tuple(m.fn.shape)}, base "
            f"{tuple(m.base.shape)}, scale {tuple(m.scale.shape)} for hc_mult = {n}"
        )


def _check_head_module(m: nn.Module, name: str) -> None:
    n = getattr(m, "hc_mult", None)
    _check_settings(n, 1, getattr(m, "eps", None), getattr(getattr(m, "input_norm", None), "eps", None),
                    where=name or "module")
    if m.hc_fn.dim() != 2 or m.hc_fn.shape[0] != n or m.hc_fn.shape[1] % n or tuple(m.hc_base.shape) != (n,) \
            or m.hc_scale.numel() != 1:
        raise ValueError(
            f"apply_to_deepseek_v4: {name}: unexpected head parameter shapes hc_fn {tuple(m.hc_fn.shape)}, hc_base "
            f"{tuple(m.hc_base.shape)}, hc_scale {tuple(m.hc_scale.shape)} for hc_mult = {n}"
        )


# ---------------------------------------------------------------------------------------
# the replacement forwards


def _hc_args(m: nn.Module, x: Tensor):
    """``(phi, alpha, bias, sinkhorn_iters, norm_eps, sinkhorn_eps, pre_eps, post_mult)`` for
    hcext's mHC ops from a DeepseekV4HyperConnection's parameters (differentiable; cast to
    the compute dtype of x, as transformers' ``.float()`` does)."""
    n = m.hc_mult
    dtype = ops.compute_dtype(x.dtype)
    phi = _swap_res_block(m.fn.to(dtype), n, 0).t()  # [n*C, n²+2n], res columns [dst, src]
    bias = _swap_res_block(m.base.to(dtype), n, 0)
    alpha = m.scale.to(dtype)
    return phi, alpha, bias, m.hc_sinkhorn_iters, m.input_norm.eps, m.hc_eps, m.hc_eps, 2.0


def _hc_forward(self, hidden_streams: Tensor, branch_output: Optional[Tensor] = None,
                post: Optional[Tensor] = None, comb: Optional[Tensor] = None):
    """hcext's DeepseekV4HyperConnection.forward.

    ``forward(x)`` -> ``(post [..., n], comb [..., n, n] as [src, dst], collapsed [..., C])``,
    as transformers' (one ``hcext.ops.mhc_pre``).

    ``forward(x, branch_output, post, comb)``, with the previous sub-layer's input streams x,
    its output and its ``post`` / ``comb``: the previous merge
    ``merged = post ⊗ branch_output + comb.T @ x`` and this module's coefficients and collapse
    of ``merged`` in one ``hcext.ops.mhc_post_pre``; returns ``(post, comb, collapsed, merged)``.
    """
    x = hidden_streams
    args = _hc_args(self, x)
    if branch_output is None:
        collapsed, h_post, h_res = ops.mhc_pre(x, *args)
        return h_post, h_res.transpose(-1, -2), collapsed
    if post is None or comb is None:
        raise TypeError("DeepseekV4HyperConnection (hcext): pass post and comb together with branch_output")
    dtype = ops.compute_dtype(x.dtype)
    merged, collapsed, h_post, h_res = ops.mhc_post_pre(
        branch_output.to(x.dtype), x, post.to(dtype), comb.to(dtype).transpose(-1, -2), *args
    )
    return h_post, h_res.transpose(-1, -2), collapsed, merged


def _layer_forward(self, hidden_states: Tensor, input_ids: Optional[Tensor] = None, **kwargs) -> Tensor:
    """hcext's DeepseekV4DecoderLayer.forward: transformers' layer with the attention/MLP
    boundary fused into one ``mhc_post_pre`` (inside ``ffn_hc``) and the MLP's merge as
    ``stream_mix_expand``. Streams ``[B, S, hc_mult, hidden]`` in and out."""
    post, comb, collapsed = self.attn_hc(hidden_states)
    attn_output, _ = self.self_attn(self.input_layernorm(collapsed), **kwargs)
    post, comb, collapsed, hidden_states = self.ffn_hc(hidden_states, attn_output, post, comb)
    mlp_output = self.mlp(self.post_attention_layernorm(collapsed), input_ids=input_ids)
    return ops.stream_mix_expand(mlp_output.to(hidden_states.dtype), hidden_states, post, comb.transpose(-1, -2))


def _head_forward(self, x: Tensor) -> Tensor:
    """hcext's DeepseekV4HyperHead.forward: ``Σ_i (σ(hc_scale · (x̃ @ hc_fnᵀ) · rstd + hc_base) + eps)_i x_i``
    as the layer input of one ``mhc_pre`` whose post / res columns are zero."""
    n = self.hc_mult
    dtype = ops.compute_dtype(x.dtype)
    fn = self.hc_fn.to(dtype)
    unused = n * n + n
    phi = torch.cat((fn.t(), fn.new_zeros(fn.shape[1], unused)), 1)
    alpha = torch.cat((self.hc_scale.to(dtype).reshape(1), fn.new_zeros(2)))
    bias = torch.cat((self.hc_base.to(dtype), fn.new_zeros(unused)))
    collapsed, _, _ = ops.mhc_pre(x, phi, alpha, bias, 1, self.input_norm.eps, 0.0, self.eps, 2.0)
    return collapsed


_FORWARDS = {_HC: _hc_forward, _LAYER: _layer_forward, _HEAD: _head_forward}


# ---------------------------------------------------------------------------------------
# patched classes: one subclass per original class, same name, forward replaced

_SUBCLASSES: Dict[type, type] = {}


def _role(cls: type, modeling) -> Optional[str]:
    for name in _NAMES:
        original = _original(getattr(modeling, name))
        if issubclass(cls, original):
            return name
    return None


def _original(cls: type) -> type:
    """The class before hcext patched it (``cls`` itself when it is not a patched class)."""
    return cls.__dict__.get("_hcext_original", cls)


def _patched_class(cls: type, role: str) -> type:
    """The subclass of ``cls`` with hcext's forward. It keeps ``cls``'s name (``_no_split_modules``,
    FSDP auto-wrap policies and ``_can_record_outputs`` match by name or isinstance) and is
    created once per class. For the decoder layer, transformers' ``GradientCheckpointingLayer``
    wraps the new forward with its checkpointing logic when the subclass is created."""
    if "_hcext_original" in cls.__dict__:
        return cls
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        namespace = {
            "forward": _FORWARDS[role],
            "_hcext_original": cls,
            "__module__": __name__,  # repr: <class 'hcext.integrations.transformers.DeepseekV4DecoderLayer'>
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__doc__ or ''}\n\n    (forward replaced by hcext.integrations.transformers)",
        }
        sub = _SUBCLASSES[cls] = type(cls.__name__, (cls,), namespace)
        if role == _HC:
            _wrap_check_on_init(sub, _check_hc_module)
        elif role == _HEAD:
            _wrap_check_on_init(sub, _check_head_module)
    return sub


def _wrap_check_on_init(sub: type, check) -> None:
    # Modules built from the patched classes (class-level patching) check their settings at
    # construction: an unsupported config raises when the model is built.
    base_init = sub.__init__

    def __init__(self, *args, **kwargs):
        base_init(self, *args, **kwargs)
        check(self, type(self).__name__)

    __init__.__wrapped__ = base_init
    sub.__init__ = __init__


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a DeepSeek-V4 mHC module, a decoder layer or a model containing
    them) runs on hcext: True when it contains such modules and every one is patched."""
    modeling = _modeling()
    found = [m for m in module.modules() if _role(type(m), modeling) is not None]
    return bool(found) and all(_patched_type(type(m)) for m in found)


def _patched_type(cls: type) -> bool:
    return any("_hcext_original" in k.__dict__ for k in cls.__mro__)


# ---------------------------------------------------------------------------------------
# public API

_CLASS_PATCH: Dict[str, type] = {}  # name -> the original class, while the classes are patched


def apply_to_deepseek_v4(model: Optional[nn.Module] = None) -> Dict[str, object]:
    """Run DeepSeek-V4's mHC (transformers ``DeepseekV4ForCausalLM`` / ``DeepseekV4Model``) on
    hcext's fused ops. See the module docstring for what changes and the numerics.

    ``model`` given (any module containing DeepSeek-V4 decoder layers, hyper-connections or
    the hyper-head): those modules are patched in place (their class becomes a same-named
    subclass whose forward uses hcext; parameters, buffers, names and the state_dict are
    untouched). Call it before ``fully_shard`` / DDP wrapping and before ``torch.compile``.

    ``model`` None: the classes in ``transformers.models.deepseek_v4.modeling_deepseek_v4`` are
    replaced by the patched subclasses, so models built afterwards (including
    ``from_pretrained``) use hcext; models built before are unchanged (pass them explicitly).

    Returns a report ``{"transformers": version, "target": ..., "patched": {class name:
    [module names] (or "class")}, "fused": ...}``, also logged at INFO on
    ``hcext.integrations.transformers``. Raises :class:`UnsupportedTransformersError` for a
    transformers version other than 5.23.x and ``ValueError`` naming the setting for an
    unsupported config (``hc_mult`` outside [1, 32], ``hc_sinkhorn_iters < 1``, a negative or
    non-finite ``hc_eps`` / ``rms_norm_eps``) or a model without DeepSeek-V4 mHC modules.
    Undo with :func:`revert_deepseek_v4`.
    """
    modeling = _modeling()
    import transformers

    fused = ("attention->MLP boundary of every decoder layer: mhc_post_pre; layer->layer boundary: "
             "stream_mix_expand + mhc_pre; head: mhc_pre")
    if model is None:
        for name in _NAMES:
            current = getattr(modeling, name)
            if name not in _CLASS_PATCH:
                _CLASS_PATCH[name] = current
            setattr(modeling, name, _patched_class(_original(current), name))
        report = dict(transformers=transformers.__version__, target="classes",
                      patched={name: "class" for name in _NAMES}, fused=fused)
        logger.info("hcext: patched transformers %s classes %s", transformers.__version__, ", ".join(_NAMES))
        return report

    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_to_deepseek_v4: expected an nn.Module or None, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) == "deepseek_v4":
        check_config(config)
    targets = []
    for name, m in model.named_modules():
        role = _role(type(m), modeling)
        if role is None:
            continue
        if role == _HC:
            _check_hc_module(m, name)
        elif role == _HEAD:
            _check_head_module(m, name)
        else:
            missing = [a for a in ("attn_hc", "ffn_hc", "self_attn", "mlp", "input_layernorm",
                                   "post_attention_layernorm") if not hasattr(m, a)]
            if missing:
                raise UnsupportedTransformersError(
                    f"apply_to_deepseek_v4: {name} ({type(m).__name__}) lacks {', '.join(missing)}"
                )
        _check_not_wrapped(m, name)
        targets.append((name, m, role))
    if not targets:
        raise ValueError(
            f"apply_to_deepseek_v4: {type(model).__name__} contains no DeepSeek-V4 mHC module "
            f"({', '.join(_NAMES)}); nothing to patch"
        )
    patched: Dict[str, List[str]] = {name: [] for name in _NAMES}
    for name, m, role in targets:
        if not _patched_type(type(m)):
            m.__class__ = _patched_class(type(m), role)
        patched[role].append(name or "<model>")
    report = dict(transformers=transformers.__version__, target=type(model).__name__, patched=patched, fused=fused)
    logger.info(
        "hcext: patched %s (transformers %s): %s",
        type(model).__name__, transformers.__version__,
        ", ".join(f"{len(v)} {k}" for k, v in patched.items()),
    )
    return report


def _check_not_wrapped(m: nn.Module, name: str) -> None:
    # fully_shard swaps a module's class for a dynamic FSDP<cls> subclass; hcext's class would
    # then have to be derived from that one. Ask for the documented order (patch, then shard).
    if _patched_type(type(m)):
        return
    if any(k.__name__ == "FSDPModule" for k in type(m).__mro__):
        raise ValueError(
            f"apply_to_deepseek_v4: {name} is already wrapped by fully_shard; call apply_to_deepseek_v4 before "
            f"sharding"
        )


def revert_deepseek_v4(model: Optional[nn.Module] = None) -> Dict[str, object]:
    """Undo :func:`apply_to_deepseek_v4`.

    ``model`` None: restore transformers' classes (models built while they were patched stay
    patched; revert them by passing them). ``model`` given: every patched module in it gets
    its original class back (a module wrapped after patching, e.g. by ``fully_shard``, cannot
    be reverted and raises ``ValueError``). Returns a report like apply's.
    """
    modeling = _modeling()
    if model is None:
        restored = []
        for name, original in list(_CLASS_PATCH.items()):
            setattr(modeling, name, original)
            restored.append(name)
        _CLASS_PATCH.clear()
        return dict(target="classes", reverted={name: "class" for name in restored})
    reverted: Dict[str, List[str]] = {name: [] for name in _NAMES}
    for name, m in model.named_modules():
        cls = type(m)
        if "_hcext_original" in cls.__dict__:
            m.__class__ = cls.__dict__["_hcext_original"]
            reverted[_role(m.__class__, modeling)].append(name or "<model>")
        elif _patched_type(cls):
            raise ValueError(
                f"revert_deepseek_v4: {name} ({cls.__name__}) was wrapped after patching; rebuild the model instead"
            )
    return dict(target=type(model).__name__, reverted=reverted)
