"""Integrations of hcext's kernels into third-party model libraries.

* :mod:`hcext.integrations.transformers`: DeepSeek-V4's mHC in Hugging Face ``transformers``
  (``apply_to_deepseek_v4`` / ``revert_deepseek_v4``).

Importing this package imports no third-party library; each integration imports its library
when it is used.
"""

__all__ = ["transformers"]
