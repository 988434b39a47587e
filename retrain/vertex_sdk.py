"""The Vertex AI SDK (``google.cloud.aiplatform``), imported on first use, by name; and
the label values that both Vertex AI adapters (launcher, registry) write.

On first use, because the import takes about 2.4 s, which a Cloud Function pays at every
cold start otherwise. By name, so that mypy does not follow it: the SDK's ``py.typed``
turns ``google.cloud`` into a typed package for mypy, and ``from google.cloud import
storage`` everywhere else then fails with attr-defined. Its objects are used as ``Any``.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from typing import Any

__all__ = ["aiplatform", "label_value"]

_NOT_LABEL = re.compile(r"[^a-z0-9_-]")


def aiplatform(submodule: str = "") -> Any:
    """``google.cloud.aiplatform``, or one of its submodules (e.g. ``"initializer"``)."""
    return importlib.import_module(
        "google.cloud.aiplatform" + (f".{submodule}" if submodule else "")
    )


def label_value(text: str) -> str:
    """``text`` as a label value (``[a-z0-9_-]``, at most 63 characters).

    A text that is already valid is kept as it is (run ids are); any other gets a digest
    suffix, so that two texts never share a label after sanitising.
    """
    value = _NOT_LABEL.sub("-", text.lower())
    if value == text and len(value) <= 63:
        return value
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{value[:52]}-{digest}"
