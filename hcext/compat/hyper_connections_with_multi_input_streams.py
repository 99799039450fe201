"""Not mirrored: importing it raises ``ImportError`` (``additional_input_paths``: extra residual
inputs with their own norms and projections, which hcext's kernels do not compute)."""

from ._unsupported_module import unsupported_module

raise unsupported_module(
    "hyper_connections_with_multi_input_streams",
    "Hyper-Connections with `additional_input_paths`, extra residual inputs mixed into the branch input",
    "`hcext.compat.hyper_connections.HyperConnections` for a single residual input, or import "
    "`hyper_connections.hyper_connections_with_multi_input_streams` from the original `hyper-connections` package.",
)
