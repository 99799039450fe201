"""Not mirrored: importing it raises ``ImportError`` (hcext's stream kernels take the channels
last, ``[..., s, d]``; the package's channel-first HC keeps them at dim 1 and projects with
1x1 ``Conv2d`` layers, a different parameter layout)."""

from ._unsupported_module import unsupported_module

raise unsupported_module(
    "hyper_connections_channel_first",
    "Hyper-Connections on channel-first `(b s) d *spatial` tensors, Conv2d projections",
    "move the channels last (e.g. `x.movedim(1, -1)`) and use `hcext.compat.hyper_connections.HyperConnections` "
    "(channels-last, `(b s) ... d`); its parameters differ (`dynamic_alpha_fn` is a tensor, not a Conv2d), so a "
    "channel-first checkpoint needs its 1x1 conv weights reshaped. Or import "
    "`hyper_connections.hyper_connections_channel_first` from the original `hyper-connections` package.",
)
