"""DTensor sharding rules for every hcext op (``torch.distributed.tensor``): tensor,
sequence and context parallelism, FSDP2 x TP meshes.

The rule, one for every op (forward and backward ops alike): hcext's ops work per token
on whole rows (mHC's RMS over the n*C values of a token, the n x n mix, HC's per-stream
norm over C), so

* the *token* (leading) dims of the streams ``x [..., n, C]`` and of every per-token
  tensor (layer input / branch output ``[..., C]``, coefficients ``[..., n]`` /
  ``[..., n, n]``, saved ``proj`` / ``rstd`` / ``stats``, incoming gradients) may be
  ``Shard``-ed, all of them on the same token dim per mesh dim; ``Replicate`` everywhere
  works too (every rank computes everything);
* the stream and channel dims (the last two of x; the trailing dims of the others) must
  not be sharded;
* parameters (mHC ``phi, alpha, bias``; HC's static and dynamic weights, scales, norm
  weight / bias) and coefficients shared by every token (``[n]``, ``[n, n]``, static HC)
  must not be sharded;
* the gradient of a parameter or of a shared coefficient is a sum over tokens: it comes
  out ``Partial("sum")`` on every mesh dim where the tokens are sharded (``Replicate``
  where they are not); per-token results follow the token placement.

A ``Partial`` input is reduced first (all-reduce or reduce-scatter, whichever DTensor
finds cheaper): no op here is linear in all of its inputs. A ``Shard`` of a stream /
channel dim, or of a parameter, raises ``RuntimeError`` naming the op, the argument and
the placement (DTensor adds "Sharding propagation failed for ..."), instead of the
all-gather (or wrong result) it would otherwise silently get.

Registration needs ``torch.distributed.tensor``, which costs ~0.7 s to import: it runs
when that module is first imported (an import hook), or at once if it already is, so
``import hcext`` neither pays for it nor needs torch.distributed. Explicitly:
``hcext.distributed.register_sharding_rules()``.
"""

import importlib.abc
import sys
import threading
import warnings
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["RULES", "register_sharding_rules", "register_when_dtensor_imported", "rules_table"]

# ---------------------------------------------------------------------------------------
# The rule of every op, by argument and result name (the C++ schemas' names).
#
# Roles of a tensor argument:
#   ("tok", k)   per token: leading dims are token dims, the last k dims must stay whole.
#   ("coef", k)  a coefficient: per token ("tok", k), or shared by every token when it has
#                only the k dims (then like a parameter).
#   "param"      a parameter: never sharded.
# Roles of a result:
#   ("tok", k)   per token, placed like the token dims.
#   ("grad", a)  the gradient of argument a: placed like a if a is per token, Partial over
#                sharded token dims if a is a parameter / shared coefficient. An absent a
#                or one that output_mask skipped gives an empty [0] tensor: Replicate.
#   ("hc", k)    hc_coeffs' coefficients: per token ("tok", k) for dynamic HC, shared
#                (Replicate) for static HC (no dynamic weights); proj / stats are empty then.

_T1, _T2, _T0 = ("tok", 1), ("tok", 2), ("tok", 0)
_C1, _C2 = ("coef", 1), ("coef", 2)
_P = "param"
_MHC_PARAMS = {"phi": _P, "alpha": _P, "bias": _P}
_HC_PARAMS = {name: _P for name in ("static_alpha", "static_beta", "dynamic_alpha", "dynamic_beta", "alpha_scale",
                                    "beta_scale", "norm_weight", "norm_bias")}
_MIX_ARGS = {"f": _T1, "x": _T2, "h_post": _C1, "h_res": _C2}

# op name -> (argument roles, result roles, the output_mask argument's name or None)
RULES: Dict[str, Tuple[Dict[str, object], List[object], Optional[str]]] = {
    "sinkhorn": ({"logits": _T2}, [_T2], None),
    "sinkhorn_backward": ({"grad": _T2, "logits": _T2}, [_T2], None),
    "stream_aggregate": ({"x": _T2, "h_pre": _C1}, [_T1], None),
    "stream_aggregate_backward": ({"grad": _T1, "x": _T2, "h_pre": _C1}, [("grad", "x"), ("grad", "h_pre")],
                                  "output_mask"),
    "stream_mix_expand": (_MIX_ARGS, [_T2], None),
    "stream_mix_expand_backward": ({"grad": _T2, **_MIX_ARGS},
                                   [("grad", "f"), ("grad", "x"), ("grad", "h_post"), ("grad", "h_res")],
                                   "output_mask"),
    "mhc_coeffs": ({"x": _T2, **_MHC_PARAMS}, [_T1, _T1, _T2], None),
    "mhc_coeffs_fwd": ({"x": _T2, **_MHC_PARAMS}, [_T1, _T1, _T2, _T1, _T0], None),
    "mhc_pre": ({"x": _T2, **_MHC_PARAMS}, [_T1, _T1, _T2], None),
    "mhc_pre_fwd": ({"x": _T2, **_MHC_PARAMS}, [_T1, _T1, _T2, _T1, _T0], None),
    "mhc_backward": (
        {"x": _T2, **_MHC_PARAMS, "proj": _T1, "rstd": _T0, "grad_layer_input": _T1, "grad_h_pre": _T1,
         "grad_h_post": _T1, "grad_h_res": _T2},
        [("grad", "x"), ("grad", "phi"), ("grad", "alpha"), ("grad", "bias")], None),
    "mhc_post_pre": ({**_MIX_ARGS, **_MHC_PARAMS}, [_T2, _T1, _T1, _T2], None),
    "mhc_post_pre_fwd": ({**_MIX_ARGS, **_MHC_PARAMS}, [_T2, _T1, _T1, _T2, _T1, _T0], None),
    "mhc_post_pre_backward": (
        {"grad_x_next": _T2, "grad_layer_input": _T1, "grad_h_post_next": _T1, "grad_h_res_next": _T2, **_MIX_ARGS,
         "x_next": _T2, **_MHC_PARAMS, "proj": _T1, "rstd": _T0},
        [("grad", "f"), ("grad", "x"), ("grad", "h_post"), ("grad", "h_res"), ("grad", "phi"), ("grad", "alpha"),
         ("grad", "bias")],
        "output_mask"),
    # DeepSeek-V4.1's shifted collapse: pre_mix is per token [..., n] or shared [n] (e_0).
    "mhc_pre_shifted": ({"x": _T2, "pre_mix": _C1, **_MHC_PARAMS}, [_T1, _T1, _T2, _T1], None),
    "mhc_pre_shifted_fwd": ({"x": _T2, "pre_mix": _C1, **_MHC_PARAMS}, [_T1, _T1, _T2, _T1, _T1, _T0], None),
    "mhc_shifted_backward": (
        {"x": _T2, "pre_mix": _C1, **_MHC_PARAMS, "proj": _T1, "rstd": _T0, "grad_layer_input": _T1,
         "grad_next_pre_mix": _T1, "grad_h_post": _T1, "grad_h_res": _T2},
        [("grad", "x"), ("grad", "pre_mix"), ("grad", "phi"), ("grad", "alpha"), ("grad", "bias")], None),
    "mhc_post_pre_shifted": ({**_MIX_ARGS, "pre_mix": _C1, **_MHC_PARAMS}, [_T2, _T1, _T1, _T2, _T1], None),
    "mhc_post_pre_shifted_fwd": ({**_MIX_ARGS, "pre_mix": _C1, **_MHC_PARAMS}, [_T2, _T1, _T1, _T2, _T1, _T1, _T0],
                                 None),
    "mhc_post_pre_shifted_backward": (
        {"grad_x_next": _T2, "grad_layer_input": _T1, "grad_h_post_next": _T1, "grad_h_res_next": _T2,
         "grad_next_pre_mix": _T1, **_MIX_ARGS, "pre_mix": _C1, "x_next": _T2, **_MHC_PARAMS, "proj": _T1,
         "rstd": _T0},
        [("grad", "f"), ("grad", "x"), ("grad", "h_post"), ("grad", "h_res"), ("grad", "pre_mix"), ("grad", "phi"),
         ("grad", "alpha"), ("grad", "bias")],
        "output_mask"),
    "hc_coeffs": ({"x": _T2, **_HC_PARAMS}, [("hc", 1), ("hc", 1), ("hc", 2)], None),
    "hc_coeffs_fwd": ({"x": _T2, **_HC_PARAMS}, [("hc", 1), ("hc", 1), ("hc", 2), ("hc", 2), ("hc", 2)], None),
    "hc_coeffs_backward": (
        {"x": _T2, **_HC_PARAMS, "proj": _T2, "stats": _T2, "grad_h_pre": _T1, "grad_h_post": _T1,
         "grad_h_res": _T2},
        [("grad", name) for name in ("x", *_HC_PARAMS)],
        "output_mask"),
}


def rules_table() -> List[Tuple[str, str, str]]:
    """``(op, token-sharded arguments, Partial results)`` per op, for documentation."""
    rows = []
    for op, (args, results, _) in RULES.items():
        if not hasattr(torch.ops.hcext, op):
            continue
        schema = getattr(torch.ops.hcext, op).default._schema
        names = [r.name for r in schema.returns]
        tok = [a for a, role in args.items() if role != _P]
        partial = [names[i] for i, role in enumerate(results)
                   if isinstance(role, tuple) and role[0] == "grad" and args[role[1]] in (_P, _C1, _C2)]
        rows.append((op, ", ".join(tok), ", ".join(partial)))
    return rows


# ---------------------------------------------------------------------------------------
# the strategy


def _fail(op: str, message: str):
    raise RuntimeError(f"hcext::{op}: {message}")


def _shard_dim(p) -> Optional[int]:
    """The tensor dim a Shard / _StridedShard placement splits, else None."""
    from torch.distributed.tensor import Shard

    if isinstance(p, Shard) or type(p).__name__ == "_StridedShard":
        return p.dim
    return None


def _arguments(op_schema) -> List[Tuple[str, object, bool]]:
    """``(name, value, is_kwarg)`` of the op's arguments in the order DTensor lists their
    strategies (positional args, then kwargs)."""
    schema = op_schema.op._schema
    out = [(schema.arguments[i].name, v, False) for i, v in enumerate(op_schema.args_schema)]
    out += [(k, v, True) for k, v in op_schema.kwargs_schema.items()]
    return out


def _argument(op_schema, name: str):
    """A (non-tensor) argument's value by name: positional, keyword or the default."""
    schema = op_schema.op._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == name:
            if i < len(op_schema.args_schema):
                return op_schema.args_schema[i]
            if name in op_schema.kwargs_schema:
                return op_schema.kwargs_schema[name]
            return arg.default_value
    raise KeyError(name)


def _describe(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _strategy(op_name: str, op_schema):
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._op_schema import OpStrategy
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

    arg_roles, result_roles, mask_name = RULES[op_name]
    args = _arguments(op_schema)
    # The tensor arguments: name -> (role, ndim, current placements).
    tensors = {}
    for name, value, _ in args:
        if isinstance(value, OpStrategy):
            spec = value.strategies[0].output_spec
            role = arg_roles.get(name)
            if role is None:  # a tensor where the rule expects none: cannot happen with these schemas
                _fail(op_name, f"no sharding rule for tensor argument {name}")
            ndim = spec.ndim
            if isinstance(role, tuple) and role[0] == "coef" and ndim == role[1]:
                role = _P  # a coefficient shared by every token: like a parameter
            tensors[name] = (role, ndim, spec.placements)

    # Unsupported placements: an error naming the op, the argument and the placement.
    for name, (role, ndim, placements) in tensors.items():
        for mesh_dim, p in enumerate(placements):
            d = _shard_dim(p)
            if d is None:
                continue
            d = d % ndim if ndim else d
            if role == _P:
                what = "a parameter" if arg_roles[name] == _P else "a coefficient shared by every token"
                _fail(op_name, f"argument {name} is {what} and must not be sharded, got placement {p!r} on mesh dim "
                      f"{mesh_dim} (placements {_describe(placements)}); make it Replicate (its gradient comes back "
                      "Partial where the tokens are sharded)")
            k = role[1]
            if d >= ndim - k:
                _fail(op_name, f"argument {name} is sharded on dim {d} ({p!r} on mesh dim {mesh_dim}, placements "
                      f"{_describe(placements)}), one of its last {k} dims (the stream / channel dims, which every "
                      f"token needs whole); only its leading (token) dims 0..{ndim - k - 1} may be sharded")

    # Token dims shared by every per-token argument (they all have x's leading dims).
    lead = {ndim - role[1] for role, ndim, _ in tensors.values() if role != _P}
    token_dims = min(lead) if len(lead) == 1 else 0  # mismatched leading dims: replicate only

    mask = _argument(op_schema, mask_name) if mask_name else None
    dynamic_hc = op_name.startswith("hc_coeffs") and (
        "dynamic_alpha" in tensors or "dynamic_beta" in tensors)

    def result_placement(i, role, token):
        """``token``: Shard(d) or Replicate() of the token dims under this strategy."""
        if isinstance(role, tuple) and role[0] == "hc":
            return token if dynamic_hc else Replicate()
        if isinstance(role, tuple) and role[0] == "grad":
            source = role[1]
            if source not in tensors or (mask is not None and i < len(mask) and not mask[i]):
                return Replicate()  # an empty [0] tensor: absent input or not requested
            if tensors[source][0] == _P:
                return Partial() if isinstance(token, Shard) else Replicate()
            return token
        return token  # ("tok", k)

    def strategy(token):
        results = [result_placement(i, role, token) for i, role in enumerate(result_roles)]
        inputs = []
        for name, value, _ in args:
            if name not in tensors:
                inputs.append(None)
            else:
                inputs.append(Replicate() if tensors[name][0] == _P else token)
        return results + inputs

    candidates = [strategy(Replicate())] + [strategy(Shard(d)) for d in range(token_dims)]
    mesh = op_schema.get_mesh_from_args()
    return expand_to_full_mesh_op_strategy(mesh, op_schema, candidates, input_index=len(result_roles))


# ---------------------------------------------------------------------------------------
# registration

_lock = threading.Lock()
_registered = False


def _schema_info(op):
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    # Every non-tensor argument (output_mask above all) is part of the propagation cache key.
    arguments = op._schema.arguments
    is_tensor = lambda a: "Tensor" in str(a.type)  # noqa: E731  (Tensor, Tensor?)
    static = [i for i, a in enumerate(arguments) if not is_tensor(a)]
    return RuntimeSchemaInfo(
        static_argnum=min(static) if static else len(arguments),
        static_kwargkey=[arguments[i].name for i in static] or None,
    )


def register_sharding_rules() -> bool:
    """Registers the DTensor sharding strategy of every hcext op (idempotent). Returns
    False where torch.distributed is unavailable."""
    global _registered
    if _registered:
        return True
    if not torch.distributed.is_available():
        return False
    with _lock:
        if _registered:
            return True
        from functools import partial

        from torch.distributed.tensor import DTensor

        propagator = DTensor._op_dispatcher.sharding_propagator
        for name in RULES:
            if not hasattr(torch.ops.hcext, name):  # a rule for an op this build lacks
                continue
            op = getattr(torch.ops.hcext, name).default
            propagator.register_op_strategy(op, partial(_strategy, name), _schema_info(op))
        _registered = True
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the rules right after ``torch.distributed.tensor`` is imported (by anyone),
    then removes itself."""

    module = "torch.distributed.tensor"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        hook = self

        def exec_then_register(module):
            exec_module(module)
            hook.remove()
            try:
                register_sharding_rules()
            except Exception as e:  # never break the user's import
                warnings.warn(f"hcext: could not register DTensor sharding rules: {type(e).__name__}: {e}")

        loader.exec_module = exec_then_register
        return spec

    def remove(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def register_when_dtensor_imported() -> None:
    """Registers now if ``torch.distributed.tensor`` is loaded, else when it gets imported."""
    if not torch.distributed.is_available():
        return
    if _RegisterAfterImport.module in sys.modules:
        register_sharding_rules()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
