"""Package names that import their module on first use (PEP 562).

The component packages re-export their cores this way, so that importing a package, or
its KFP wrapper ``component``, to build a pipeline does not pull in scikit-learn, scipy
and pandas (seconds per process): only the tasks that run a step need them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["exports"]


def exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``where[name]`` (a module
    name) the first time ``name`` is asked for."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    return __getattr__
