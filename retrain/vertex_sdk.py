"""The Vertex AI SDK (``google.cloud.aiplatform``), imported on first use, by name.

On first use, because the import takes about 2.4 s, which a Cloud Function pays at every
cold start otherwise. By name, so that mypy does not follow it: the SDK's ``py.typed``
turns ``google.cloud`` into a typed package for mypy, and ``from google.cloud import
storage`` everywhere else then fails with attr-defined. Its objects are used as ``Any``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["aiplatform"]


def aiplatform(submodule: str = "") -> Any:
    """``google.cloud.aiplatform``, or one of its submodules (e.g. ``"initializer"``)."""
    return importlib.import_module(
        "google.cloud.aiplatform" + (f".{submodule}" if submodule else "")
    )
