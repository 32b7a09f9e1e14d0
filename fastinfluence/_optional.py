"""Imports of optional dependencies that say, when one is missing, which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, package: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (from the PyPI package ``package``) for ``purpose``.

    Raises:
        ImportError: naming ``purpose``, ``package`` and ``pip install "fastinfluence[<extra>]"``
            when the import fails.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs {package}, which is not installed: "
            f'pip install "fastinfluence[{extra}]" (or pip install {package})'
        ) from error
