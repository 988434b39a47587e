"""Evaluate: metrics of the candidate and the champion on the same evaluation rows.

The names below are imported on first use (PEP 562): importing this package, or its KFP
wrapper ``component``, to build a pipeline does not pull in scikit-learn and pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.evaluate.evaluation import (
        EvaluationError,
        EvaluationResult,
        ModelMetrics,
        evaluate,
    )

__all__ = ["EvaluationError", "EvaluationResult", "ModelMetrics", "evaluate"]

_WHERE = {
    "EvaluationError": "components.evaluate.evaluation",
    "EvaluationResult": "components.evaluate.evaluation",
    "ModelMetrics": "components.evaluate.evaluation",
    "evaluate": "components.evaluate.evaluation",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
