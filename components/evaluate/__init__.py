"""Evaluate: metrics of the candidate and the champion on the same evaluation rows."""

from components.evaluate.evaluation import (
    EvaluationError,
    EvaluationResult,
    ModelMetrics,
    evaluate,
)

__all__ = ["EvaluationError", "EvaluationResult", "ModelMetrics", "evaluate"]
