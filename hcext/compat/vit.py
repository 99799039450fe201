"""Not mirrored: importing it raises ``ImportError`` (the package's example ViT is a model, not a
hyper-connection; its only hyper-connection dependency, ``hyper_connections.mHCv2.mHC``, is
mirrored by :mod:`hcext.compat.mHCv2`)."""

from ._unsupported_module import unsupported_module

raise unsupported_module(
    "vit",
    "an example Vision Transformer built on `hyper_connections.mHCv2.mHC`",
    "keep the package's `ViT` and make it use hcext's kernels by importing `mHC` from `hcext.compat.mHCv2` "
    "(same parameters, so its checkpoints load with strict=True), e.g. "
    "`import hyper_connections.vit as vit, hcext.compat.mHCv2 as v2; vit.mHC = v2.mHC` before building the model.",
)
