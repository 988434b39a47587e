"""KFP wrapper of evaluate: score the candidate model; log metrics and write a JSON report.

kfp ships only the function's source to the task, so the core is imported in the body.
"""

# ruff: noqa: PLC0415

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from pipelines.image import build_component

__all__ = ["evaluate_model", "evaluate_op"]


def evaluate_model(
    *,
    model_artifact: Input[Model],
    eval_data: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[Artifact],
) -> None:
    """Log every candidate metric; ``report`` is ``EvaluationResult.to_dict()`` as JSON."""
    from pathlib import Path

    from components.artifacts import write_json
    from components.evaluate import evaluate

    result = evaluate(Path(model_artifact.path), eval_data.path).to_dict()
    for name, value in result["candidate"].items():
        metrics.log_metric(name, value)
    write_json(Path(report.path), result)


evaluate_op = build_component(evaluate_model)
