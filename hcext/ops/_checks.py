"""What the fake kernels of every op family share: the compute-dtype rule, the argument
checks that more than one family repeats, and the shapes of their results.

A fake kernel runs instead of the C++ kernel under torch.compile and export. Its checks
mirror the C++ ones (csrc/<family>/<family>_checks.h), so traced code rejects what eager
code rejects, with the same message (the C++ one sometimes adds detail, and prints dtypes
as Float rather than torch.float32). Tests match parts of these messages: change the
wording only together with the C++ side.
"""

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# 1 <= n <= MAX_N streams per token: the kernels' compile-time dispatch over n stops at 32.
MAX_N = 32
# Far beyond any useful Sinkhorn iteration count; keeps the kernels' workspace sizes in range.
MAX_ITERS = 1 << 20
# The dtypes of x that the coefficient ops (mhc_*, hc_coeffs) accept.
X_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one compute-dtype rule: the dtype of the coefficient math, of the coefficients
    and parameters, and of their gradients, for inputs of ``dtype``. fp64 stays fp64
    (gradcheck); fp32, bf16 and fp16 are computed in (and return) fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# double backward


def first_order_only(op: str) -> Callable:
    """Marks the backward formula of ``op`` as first-order only, loudly.

    hcext's backward ops are fused kernels with no derivative of their own. Without this,
    a second derivative through them (``torch.autograd.grad(..., create_graph=True)``
    followed by another backward: gradient penalties, Hessian-vector products,
    ``torch.func`` transforms of a gradient) would treat the first-order gradient as a
    constant and silently come out as zero. With it, the gradient is computed as usual
    (with no graph of its own), and every gradient it returns under ``create_graph=True``
    is routed through a node that raises, when reached by the second backward, an error
    naming the op. First-order training, including under ``create_graph=True`` when the
    result is never differentiated again, is unaffected.
    """
    message = (
        f"{op} does not support double backward: its gradient is computed by a fused kernel that has no "
        "derivative of its own, so a second derivative through it (a gradient penalty, a Hessian-vector "
        "product, torch.func.hessian or jacfwd of a gradient) is not available. Differentiate the pure-PyTorch "
        "reference (hcext.reference) for such terms."
    )

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # a plain backward: nothing to guard
                return outputs
            # create_graph=True: the gradients would depend on the incoming gradients and on
            # the saved inputs; when any of those requires grad, make every gradient an
            # output of an error node instead of a silently constant tensor.
            sources = list(grads) + list(getattr(ctx, "saved_tensors", ()))
            if not any(isinstance(t, Tensor) and t.requires_grad for t in sources):
                return outputs
            single = not isinstance(outputs, tuple)
            outs = (outputs,) if single else outputs
            tensors = [i for i, o in enumerate(outs) if isinstance(o, Tensor)]
            if not tensors:
                return outputs
            guarded = torch._C._functions.DelayedError(message, len(tensors))(
                *[outs[i].detach().requires_grad_(True) for i in tensors]
            )
            guarded = guarded if isinstance(guarded, tuple) else (guarded,)
            result = list(outs)
            for i, g in zip(tensors, guarded):
                result[i] = g
            return result[0] if single else tuple(result)

        return wrapper

    return decorate


# ---------------------------------------------------------------------------------------
# registration

# (qualname, fake kernel) of every family, registered by hcext/ops/__init__.py. torch
# requires register_fake to be called from the module that the C++ library names in
# m.set_python_module("hcext.ops"), so the family modules only declare their fakes.
FAKE_KERNELS: List[Tuple[str, Callable]] = []


def fake_kernel(qualname: str) -> Callable[[Callable], Callable]:
    """Declares ``fn`` as the fake kernel of the op ``qualname`` ("hcext::...")."""

    def declare(fn: Callable) -> Callable:
        FAKE_KERNELS.append((qualname, fn))
        return fn

    return declare


# ---------------------------------------------------------------------------------------
# results


def per_token(x: Tensor, dtype: torch.dtype, *shape: int) -> Tensor:
    """A result with x's leading dims (x is [..., n, C]) followed by ``shape``."""
    return x.new_empty((*x.shape[:-2], *shape), dtype=dtype)


def contiguous_like(t: Tensor) -> Tensor:
    # The kernels write their results contiguous, whatever the input's strides.
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def grad_or_skipped(wanted: bool, like: Tensor) -> Tensor:
    # A backward op returns a contiguous tensor of the input's shape, or an empty [0] for a
    # gradient that output_mask did not request.
    return like.new_empty(like.shape if wanted else (0,))


# ---------------------------------------------------------------------------------------
# scalars


def check_iters(iters: int, name: str, op: str) -> None:
    torch._check(1 <= iters <= MAX_ITERS, lambda: f"{op}: expected {name} in [1, {MAX_ITERS}], got {iters}")


def check_finite_eps(value: float, name: str, op: str) -> None:
    """An epsilon added to a denominator: finite and >= 0."""
    torch._check(
        math.isfinite(value) and value >= 0, lambda: f"{op}: expected {name} finite and >= 0, got {value}"
    )


def check_finite(value: float, name: str, op: str) -> None:
    torch._check(math.isfinite(value), lambda: f"{op}: expected {name} finite, got {value}")


def check_device_like(t: Tensor, name: str, ref: Tensor, ref_name: str, op: str) -> None:
    torch._check(
        t.device == ref.device, lambda: f"{op}: expected {name} on {ref.device} like {ref_name}, got {t.device}"
    )


# ---------------------------------------------------------------------------------------
# The coefficient ops (mhc_*, hc_coeffs): x [..., n, C], parameters in the compute dtype


def check_coeff_x(x: Tensor, op: str) -> Tuple[int, int]:
    """x [..., n, C] of a coefficient op. Returns (n, C)."""
    torch._check(
        x.dim() >= 2, lambda: f"{op}: expected x of shape [..., n, C] with at least 2 dims, got shape {tuple(x.shape)}"
    )
    torch._check(
        x.dtype in X_DTYPES, lambda: f"{op}: expected x of dtype float32, bfloat16, float16 or float64, got {x.dtype}"
    )
    n, C = x.shape[-2], x.shape[-1]
    torch._check(1 <= n <= MAX_N, lambda: f"{op}: expected n = x.size(-2) in [1, {MAX_N}], got {n}")
    torch._check(C >= 1, lambda: f"{op}: expected C = x.size(-1) >= 1, got {C}")
    return n, C


def check_coeff_tensor(t: Tensor, name: str, x: Tensor, dtype: torch.dtype, op: str) -> None:
    """A parameter or saved intermediate of a coefficient op: ``dtype`` (the compute dtype)
    and x's device."""
    torch._check(t.dtype == dtype, lambda: f"{op}: expected {name} of dtype {dtype}, got {t.dtype}")
    torch._check(t.device == x.device, lambda: f"{op}: expected {name} on {x.device} (x's device), got {t.device}")


def check_optional_grad(g: Optional[Tensor], name: str, numel: int, x: Tensor, op: str) -> None:
    """An incoming gradient of a coefficient op's backward: None means zero; else any
    floating dtype with ``numel`` elements, on x's device."""
    if g is None:
        return
    torch._check(
        g.numel() == numel, lambda: f"{op}: expected {name} with {numel} elements, got shape {list(g.shape)}"
    )
    torch._check(g.dtype.is_floating_point, lambda: f"{op}: expected {name} to be floating point, got {g.dtype}")
    torch._check(g.device == x.device, lambda: f"{op}: expected {name} on {x.device} (x's device), got {g.device}")


# ---------------------------------------------------------------------------------------
# The stream ops (stream_aggregate, stream_mix_expand; mhc_post_pre's merge): x [..., n, C]
# in any floating dtype, coefficients per token or shared by every token.


def check_streams_x(x: Tensor, op: str) -> int:
    """Streams x [..., n, C] of a stream op. Returns n."""
    torch._check(
        x.dim() >= 2, lambda: f"{op}: expected x of shape [..., n, C] with at least 2 dims, got {x.dim()} dim(s)"
    )
    torch._check(
        x.dtype.is_floating_point,
        lambda: f"{op}: expected x to be a floating-point tensor (float32, float64, bfloat16 or float16), "
        f"got {x.dtype}",
    )
    n = x.shape[-2]
    torch._check(1 <= n <= MAX_N, lambda: f"{op}: expected n (x's dim -2) in [1, {MAX_N}], got {n}")
    return n


def check_streams_coef(h: Tensor, name: str, rank: int, x: Tensor, op: str) -> None:
    """h_pre / h_post (rank 1) or h_res (rank 2): per token (x's leading dims, then n or
    n, n) or shared by every token ([n] or [n, n]), in x's compute dtype."""
    check_device_like(h, name, x, "x", op)
    want = compute_dtype(x.dtype)
    torch._check(h.dtype == want, lambda: f"{op}: expected {name} to be {want}, got {h.dtype}")
    shared_shape = (x.shape[-2],) * rank
    token_shape = tuple(x.shape[:-2]) + shared_shape
    shape = tuple(h.shape)
    torch._check(
        shape == token_shape or shape == shared_shape,
        lambda: f"{op}: expected {name} of shape {list(token_shape)} (per token) or {list(shared_shape)} "
        f"(shared by every token), got {list(shape)}",
    )


def check_streams_f(f: Tensor, x: Tensor, op: str) -> None:
    """The branch output f [..., C]: x's leading dims, C and dtype."""
    check_device_like(f, "f", x, "x", op)
    torch._check(f.dtype == x.dtype, lambda: f"{op}: expected f to have x's dtype {x.dtype}, got {f.dtype}")
    torch._check(
        f.dim() >= 1 and f.shape[-1] == x.shape[-1],
        lambda: f"{op}: expected f's last dim (C) to be {x.shape[-1]} like x's, got f of shape {list(f.shape)}",
    )
    torch._check(
        tuple(f.shape[:-1]) == tuple(x.shape[:-2]),
        lambda: f"{op}: expected f's leading dims to be {list(x.shape[:-2])} (x's leading dims), "
        f"got f of shape {list(f.shape)}",
    )


def check_streams_grad(grad: Tensor, out_shape: Sequence[int], x: Tensor, op: str) -> None:
    """The incoming gradient of a stream op's backward: the output's shape, x's dtype."""
    check_device_like(grad, "grad", x, "x", op)
    torch._check(
        grad.dtype == x.dtype, lambda: f"{op}: expected grad to have x's dtype {x.dtype}, got {grad.dtype}"
    )
    torch._check(
        tuple(grad.shape) == tuple(out_shape),
        lambda: f"{op}: expected grad of shape {list(out_shape)} (the output's), got {list(grad.shape)}",
    )
