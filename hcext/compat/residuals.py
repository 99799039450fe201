"""Not mirrored: importing it raises ``ImportError`` (gated / orthogonal residual updates, used as
a ``depth_residual_fn``; hcext fuses plain addition into its kernels and supports no other)."""

from ._unsupported_module import unsupported_module

raise unsupported_module(
    "residuals",
    "GatedResidual, GRUGatedResidual, OrthogonalResidualUpdate, MVSplitResidualUpdate for `depth_residual_fn`",
    "the default `depth_residual_fn` (addition, fused into hcext's kernels) with the hcext.compat modules, or the "
    "original `hyper-connections` package with `hyper_connections.residuals` for a custom residual update.",
)
