"""Initial values of the Hyper-Connections parameters (HC, arXiv 2409.19606v3, §2.3 and
Algorithm 2), as keyword arguments for :func:`hcext.ops.hc_coeffs`.

At these values every HC module is the identity re-arrangement of a Pre-Norm residual
connection: with the n streams initialised as copies of the embedding (HC §2.3, "Network
I/O"), sub-layer k reads stream ``k mod n`` (A_m = e_{k mod n}), keeps every stream
(A_r = I) and adds its output to every stream (B = 1), so all streams stay equal to the
Pre-Norm residual stream. Dynamic HC starts with zero dynamic weights (tanh(0) = 0) and
scales s_α = s_β = 0.01, so it starts as static HC.
"""

from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = ["hc_static", "hc_dynamic"]


def hc_static(
    n: int, layer_index: int, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None
) -> Dict[str, Tensor]:
    """Static HC parameters of sub-layer ``layer_index`` (HC Alg. 2, Eq. 13-14).

    Returns ``dict(static_alpha, static_beta)``: ``static_alpha [n, n+1] = [A_m | A_r]`` with
    ``A_m = e_{layer_index mod n}`` (the sub-layer reads one stream) and ``A_r = I_n``, and
    ``static_beta [n] = B = 1`` (its output is added to every stream). ``layer_index`` counts
    sub-layers: attention and FFN of one transformer layer are two (each has its own HC).
    """
    if not 1 <= n <= 32:
        raise ValueError(f"hc_static: expected n in [1, 32], got {n}")
    if layer_index < 0:
        raise ValueError(f"hc_static: expected layer_index >= 0, got {layer_index}")
    static_alpha = torch.zeros(n, n + 1, dtype=dtype, device=device)
    static_alpha[layer_index % n, 0] = 1.0
    static_alpha[:, 1:] = torch.eye(n, dtype=dtype, device=device)
    static_beta = torch.ones(n, dtype=dtype, device=device)
    return dict(static_alpha=static_alpha, static_beta=static_beta)


def hc_dynamic(
    n: int,
    C: int,
    layer_index: int,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    norm_bias: bool = False,
) -> Dict[str, Tensor]:
    """Dynamic HC parameters of sub-layer ``layer_index`` (HC Alg. 2): the static part of
    :func:`hc_static`, plus ``dynamic_alpha [C, n+1]`` (W_m | W_r) and ``dynamic_beta [C]``
    (W_β) set to zero, ``alpha_scale`` / ``beta_scale`` 0-dim tensors of 0.01 (s_α, s_β) and
    ``norm_weight [C]`` of ones. ``norm_bias=True`` adds a zero ``norm_bias [C]`` (the paper's
    LayerNorm has one; use ``norm="layer"`` with it).
    """
    if C < 1:
        raise ValueError(f"hc_dynamic: expected C >= 1, got {C}")
    params = hc_static(n, layer_index, dtype=dtype, device=device)
    params.update(
        dynamic_alpha=torch.zeros(C, n + 1, dtype=dtype, device=device),
        dynamic_beta=torch.zeros(C, dtype=dtype, device=device),
        alpha_scale=torch.full((), 0.01, dtype=dtype, device=device),
        beta_scale=torch.full((), 0.01, dtype=dtype, device=device),
        norm_weight=torch.ones(C, dtype=dtype, device=device),
    )
    if norm_bias:
        params["norm_bias"] = torch.zeros(C, dtype=dtype, device=device)
    return params
