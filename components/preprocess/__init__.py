"""Validate and preprocess: input objects in, ordered train and eval Parquet files out.

The names below are imported on first use (PEP 562): importing this package, or its KFP
wrapper ``component``, to build a pipeline does not pull in pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.preprocess.preprocessing import PreprocessResult, preprocess
    from components.preprocess.validation import Rule, ValidationError

__all__ = ["PreprocessResult", "Rule", "ValidationError", "preprocess"]

_WHERE = {
    "PreprocessResult": "components.preprocess.preprocessing",
    "preprocess": "components.preprocess.preprocessing",
    "Rule": "components.preprocess.validation",
    "ValidationError": "components.preprocess.validation",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
