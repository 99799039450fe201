"""hcext::stream_aggregate and hcext::stream_mix_expand (and their backward ops): the
wrappers, the fake kernels and the autograd formulas. The spec in code is
``hcext.reference.stream_aggregate`` / ``stream_mix_expand``.

Streams x are [..., n, C] (1 <= n <= 32). Coefficients are per token (h_pre / h_post
[..., n], h_res [..., n, n], with x's leading dims) or shared by every token ([n],
[n, n]: static Hyper-Connections). Coefficients are float32, or float64 when x is
float64. The backward ops take output_mask (which gradients to compute). A gradient
that is not requested comes back as an empty [0] tensor.
"""

import torch
from torch import Tensor

from ._checks import (
    check_streams_coef,
    check_streams_f,
    check_streams_grad,
    check_streams_x,
    fake_kernel,
    grad_or_skipped,
    first_order_only,
)

__all__ = ["stream_aggregate", "stream_mix_expand"]


def stream_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """The layer input ``y = H_pre x``: ``y[..., c] = sum_i h_pre[..., i] * x[..., i, c]``.

    ``x [..., n, C]`` is float32, float64, bfloat16 or float16 with 1 <= n <= 32.
    ``h_pre`` is either per token, ``[..., n]``, or shared by every token, ``[n]``. It is
    float32, or float64 when x is float64. The sum is accumulated in fp32 (fp64 for fp64
    x). The result has x's dtype and shape ``[..., C]``. x may have any strides.
    Differentiable in x and h_pre. The gradient of a shared h_pre is summed over the
    tokens in a fixed order, so it is deterministic. See
    ``hcext.reference.stream_aggregate``.
    """
    return torch.ops.hcext.stream_aggregate.default(x, h_pre)


def stream_mix_expand(f: Tensor, x: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """The residual merge ``x' = H_res x + H_post^T f``, in one pass over the streams.

    ``out[..., i, c] = sum_j h_res[..., i, j] * x[..., j, c] + h_post[..., i] * f[..., c]``.
    ``x [..., n, C]`` holds the streams, and ``f [..., C]`` is the sub-layer's output. f
    has x's leading dims, C and dtype. ``h_post`` is ``[..., n]`` per token or ``[n]``
    shared. ``h_res`` is ``[..., n, n]`` per token or ``[n, n]`` shared, indexed
    ``[dst, src]``. Coefficients are float32, or float64 when x is float64. The math is
    fp32 and the result has x's dtype and shape. Any strides. Differentiable in every
    input. Shared coefficients' gradients are summed over tokens deterministically. See
    ``hcext.reference.stream_mix_expand``.
    """
    return torch.ops.hcext.stream_mix_expand.default(f, x, h_post, h_res)


# ---------------------------------------------------------------------------------------
# fake kernels


def _aggregate_shape(x: Tensor):
    return (*x.shape[:-2], x.shape[-1])


def _check_mix_args(f: Tensor, x: Tensor, h_post: Tensor, h_res: Tensor, op: str) -> None:
    check_streams_x(x, op)
    check_streams_f(f, x, op)
    check_streams_coef(h_post, "h_post", 1, x, op)
    check_streams_coef(h_res, "h_res", 2, x, op)


@fake_kernel("hcext::stream_aggregate")
def _stream_aggregate_fake(x, h_pre):
    op = "hcext::stream_aggregate"
    check_streams_x(x, op)
    check_streams_coef(h_pre, "h_pre", 1, x, op)
    return x.new_empty(_aggregate_shape(x))


@fake_kernel("hcext::stream_aggregate_backward")
def _stream_aggregate_backward_fake(grad, x, h_pre, output_mask=(True, True)):
    op = "hcext::stream_aggregate_backward"
    check_streams_x(x, op)
    check_streams_coef(h_pre, "h_pre", 1, x, op)
    check_streams_grad(grad, _aggregate_shape(x), x, op)
    return grad_or_skipped(output_mask[0], x), grad_or_skipped(output_mask[1], h_pre)


@fake_kernel("hcext::stream_mix_expand")
def _stream_mix_expand_fake(f, x, h_post, h_res):
    _check_mix_args(f, x, h_post, h_res, "hcext::stream_mix_expand")
    return x.new_empty(x.shape)


@fake_kernel("hcext::stream_mix_expand_backward")
def _stream_mix_expand_backward_fake(grad, f, x, h_post, h_res, output_mask=(True, True, True, True)):
    op = "hcext::stream_mix_expand_backward"
    _check_mix_args(f, x, h_post, h_res, op)
    check_streams_grad(grad, x.shape, x, op)
    return tuple(grad_or_skipped(m, t) for m, t in zip(output_mask, (f, x, h_post, h_res)))


# ---------------------------------------------------------------------------------------
# autograd


def _save_inputs(ctx, inputs, output):
    # Inputs only: both backward ops need the inputs, never the output.
    ctx.save_for_backward(*inputs)


@first_order_only("hcext::stream_aggregate")
def _stream_aggregate_backward(ctx, grad):
    x, h_pre = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:2]]
    grad_x, grad_h_pre = torch.ops.hcext.stream_aggregate_backward.default(grad, x, h_pre, mask)
    return (grad_x if mask[0] else None), (grad_h_pre if mask[1] else None)


@first_order_only("hcext::stream_mix_expand")
def _stream_mix_expand_backward(ctx, grad):
    f, x, h_post, h_res = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:4]]
    grads = torch.ops.hcext.stream_mix_expand_backward.default(grad, f, x, h_post, h_res, mask)
    return tuple(g if m else None for g, m in zip(grads, mask))


torch.library.register_autograd("hcext::stream_aggregate", _stream_aggregate_backward, setup_context=_save_inputs)
torch.library.register_autograd("hcext::stream_mix_expand", _stream_mix_expand_backward, setup_context=_save_inputs)
