"""Evaluate: metrics of the candidate and the champion on the same evaluation rows.

The names below are imported on first use (components.lazy): building a pipeline does not
pull in scikit-learn and pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.lazy import exports

if TYPE_CHECKING:
    from components.evaluate.evaluation import (
        EvaluationError,
        EvaluationResult,
        ModelMetrics,
        evaluate,
    )

__all__ = ["EvaluationError", "EvaluationResult", "ModelMetrics", "evaluate"]

__getattr__ = exports(
    __name__,
    {
        "EvaluationError": "components.evaluate.evaluation",
        "EvaluationResult": "components.evaluate.evaluation",
        "ModelMetrics": "components.evaluate.evaluation",
        "evaluate": "components.evaluate.evaluation",
    },
)
