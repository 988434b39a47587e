"""KFP wrapper of preprocess: settings from retrain.yaml text, splits out as artifacts.

kfp ships only the function's source to the task, so the core is imported in the body.
"""

# ruff: noqa: PLC0415

from kfp.dsl import Artifact, Dataset, Output

from pipelines.image import build_component

__all__ = ["preprocess_data", "preprocess_op"]


def preprocess_data(
    *,
    config_yaml: str,
    model: str,
    data_uris: list[str],
    run_id: str,
    request_id: str,
    reason: str,
    job_name: str = "",
    train_data: Output[Dataset],
    eval_data: Output[Dataset],
    summary: Output[Artifact],
) -> None:
    """Validate ``data_uris``, window and split them; write the splits and summary.json.

    No ``data_uris`` (a scheduled job) means the model's current data window."""
    import shutil
    import tempfile
    from pathlib import Path

    from components.preprocess import preprocess
    from components.runs import RunContext
    from pipelines.runtime import step

    run = RunContext.parse(model, run_id, request_id, reason, job_name)

    with (
        step("preprocess", config_yaml, run) as (config, settings),
        tempfile.TemporaryDirectory() as tmp,
    ):
        if not data_uris:
            from retrain.data_objects import data_window

            data_uris = data_window(config, model, [])
        result = preprocess(data_uris, settings, Path(tmp))
        shutil.copyfile(result.train_path, train_data.path)
        shutil.copyfile(result.eval_path, eval_data.path)
        shutil.copyfile(result.summary_path, summary.path)
    features = list(result.features)
    train_data.metadata.update({"rows": result.train_rows, "features": features})
    eval_data.metadata.update({"rows": result.eval_rows, "features": features})


preprocess_op = build_component(preprocess_data)
