"""KFP wrapper of train: the training split in, a model directory out as a Model artifact.

kfp ships only the function's source to the task, so the core is imported in the body.
"""

# ruff: noqa: PLC0415

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from pipelines.image import build_component

__all__ = ["train_model", "train_op"]


def train_model(
    *,
    config_yaml: str,
    model: str,
    run_id: str,
    request_id: str,
    reason: str,
    job_name: str = "",
    train_data: Input[Dataset],
    summary: Input[Artifact],
    model_artifact: Output[Model],
) -> None:
    """Fit the model's estimator; the artifact is a directory (model.joblib, metadata.json)."""
    from pathlib import Path

    from components.runs import RunContext
    from components.train import train
    from pipelines.runtime import step

    run = RunContext.parse(model, run_id, request_id, reason, job_name)

    with step("train", config_yaml, run) as (_, settings):
        result = train(
            train_data.path, settings, Path(model_artifact.path), summary_path=Path(summary.path)
        )
    model_artifact.metadata.update(
        {
            "framework": "scikit-learn",
            "estimator": settings.estimator.name,
            "rows": result.rows,
            "features": list(result.features),
        }
    )


train_op = build_component(train_model)
