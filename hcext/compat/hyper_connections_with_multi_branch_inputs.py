"""Not mirrored: importing it raises ``ImportError`` (``num_branch_inputs > 1``: several branch
inputs and outputs per layer, which hcext's kernels do not compute)."""

from ._unsupported_module import unsupported_module

raise unsupported_module(
    "hyper_connections_with_multi_branch_inputs",
    "Hyper-Connections with `num_branch_inputs` > 1 branch inputs per layer",
    "`hcext.compat.hyper_connections.HyperConnections` (one branch input), or import "
    "`hyper_connections.hyper_connections_with_multi_branch_inputs` from the original `hyper-connections` package.",
)
