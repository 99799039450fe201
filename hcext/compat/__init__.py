"""Drop-in compatibility layers for other Hyper-Connections implementations.

``hcext.compat.hyper_connections`` mirrors the ``hyper-connections`` package (v0.4.x): this
package re-exports its public names, as ``hyper_connections/__init__.py`` does.
"""

from .hyper_connections import (  # noqa: F401
    AttentionPoolReduceStream,
    HyperConnections,
    ManifoldConstrainedHyperConnections,
    Residual,
    StreamEmbed,
    get_expand_reduce_stream_functions,
    get_init_and_expand_reduce_stream_functions,
    mc_get_expand_reduce_stream_functions,
    mc_get_init_and_expand_reduce_stream_functions,
    mHC,
)
