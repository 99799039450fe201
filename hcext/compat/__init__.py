"""Drop-in compatibility layers for other Hyper-Connections implementations.

``hcext.compat.hyper_connections`` mirrors the ``hyper-connections`` package (v0.4.x): this
package re-exports its public names, as ``hyper_connections/__init__.py`` does. The package's
modules, as ``hcext.compat.<same name>``:

* ``hyper_connections``, ``manifold_constrained_hyper_connections``: mirrored (HC, mHC,
  Residual, StreamEmbed, AttentionPoolReduceStream, the expand/reduce and init functions).
* ``mHCv2``: mirrored (the newer mHC, streams in their own dim ``[..., s, d]``).
* ``hyper_connections_channel_first``, ``hyper_connections_with_multi_input_streams``,
  ``hyper_connections_with_multi_branch_inputs``, ``vit``, ``triton_sinkhorn``, ``residuals``:
  not mirrored; importing one raises ``ImportError`` naming what to use instead.
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
