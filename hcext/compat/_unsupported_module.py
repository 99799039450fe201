"""The ``ImportError`` raised by the compat modules that mirror nothing (see their docstrings)."""


def unsupported_module(name: str, what: str, instead: str) -> ImportError:
    """``hcext.compat.<name>`` is not provided: ``what`` it is in the package, ``instead`` what to use."""
    return ImportError(
        f"hcext.compat.{name} is not provided: the package's `hyper_connections.{name}` ({what}) has no hcext "
        f"equivalent. Instead: {instead}",
        name=f"hcext.compat.{name}",
    )
