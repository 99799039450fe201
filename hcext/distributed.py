"""hcext with ``torch.distributed``: DTensor sharding rules and helpers for tensor,
sequence, context and pipeline parallelism (README, "Distributed training").

Every hcext op has a DTensor sharding rule (``hcext/ops/_sharding.py``): the token
(leading) dims of the streams and of every per-token tensor may be sharded, the stream and
channel dims and the parameters must not be, and parameter gradients come out ``Partial``
where the tokens are sharded. The rules are registered when ``torch.distributed.tensor``
is first imported (``import hcext`` does not import it); :func:`register_sharding_rules`
does it explicitly. ``hcext.nn`` modules take DTensor streams: their plain parameters
become Replicate DTensors on the streams' mesh inside ``forward`` (gradients all-reduced
on the way back), and a branch must return a DTensor next to DTensor streams.

This module imports nothing from ``torch.distributed.tensor`` itself.
"""

from typing import Tuple

import torch

from .ops._sharding import RULES, register_sharding_rules, rules_table

__all__ = ["RULES", "register_sharding_rules", "rules_table", "collective_save_ops", "stream_boundary_bytes"]


def collective_save_ops() -> Tuple:
    """The functional collectives that tensor / sequence parallelism runs inside a recompute
    block (the all-gather before a column-parallel linear, the reduce-scatter after a
    row-parallel one, and their waits), for ``save_ops``::

        HyperConnectionStack(layers, "auto", save_ops=hcext.nn.DEFAULT_SAVE_OPS + collective_save_ops())

    With the default policy they are recomputed in backward (selective checkpointing re-runs
    every op it does not save), i.e. communicated again; saved, they cost their outputs'
    memory instead. Empty where torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return ()
    ops = getattr(torch.ops, "_c10d_functional")
    names = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "wait_tensor")
    return tuple(getattr(ops, name) for name in names if hasattr(ops, name))


def stream_boundary_bytes(tokens: int, num_streams: int, dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the streams ``[tokens, n, C]`` sent from one pipeline stage to the next per
    micro-batch (the same again for their gradient in backward): n times a residual
    model's hidden state ``[tokens, C]``."""
    return tokens * num_streams * dim * torch.empty((), dtype=dtype).element_size()
