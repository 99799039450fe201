"""Mirror of ``hyper_connections.manifold_constrained_hyper_connections``: the mHC names without
the ``mc_`` prefix, for code that imports from that submodule. Everything lives in
:mod:`hcext.compat.hyper_connections`."""

from .hyper_connections import (  # noqa: F401
    ManifoldConstrainedHyperConnections,
    Residual,
    StreamEmbed,
    AttentionPoolReduceStream,
    mHC,
    add,
    log_domain_sinkhorn_knopps,
    sinkhorn_knopps,
)
from .hyper_connections import mc_get_expand_reduce_stream_functions as get_expand_reduce_stream_functions  # noqa: F401
from .hyper_connections import (  # noqa: F401
    mc_get_init_and_expand_reduce_stream_functions as get_init_and_expand_reduce_stream_functions,
)
