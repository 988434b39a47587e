"""KFP wrappers of evaluate: score candidate and champion, log metrics, publish the report;
and the exit handler that publishes a failure report when any step failed.

kfp ships only the function's source to the task, so the core is imported in the body.
"""

# ruff: noqa: PLC0415

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from pipelines.image import build_component

__all__ = ["evaluate_model", "evaluate_op", "report_failure", "report_failure_op"]


def evaluate_model(
    *,
    config_yaml: str,
    model: str,
    run_id: str,
    request_id: str,
    reason: str,
    job_name: str = "",
    model_artifact: Input[Model],
    eval_data: Input[Dataset],
    summary: Input[Artifact],
    metrics: Output[Metrics],
    report: Output[Artifact],
) -> None:
    """Log the candidate's metrics; publish the MetricsReport; ``report`` keeps it and its id."""
    import json
    from pathlib import Path

    from components.evaluate.report import evaluate_and_report
    from components.runs import RunContext
    from pipelines.runtime import step
    from retrain import statedb
    from retrain.bus import PubsubBus
    from retrain.gatekeeper.registry import FirestoreRegistry

    run = RunContext.parse(model, run_id, request_id, reason, job_name)
    with step("evaluate", config_yaml, run) as (settings, _):
        published, message_id = evaluate_and_report(
            settings,
            run,
            model_dir=Path(model_artifact.path),
            eval_path=Path(eval_data.path),
            summary_path=Path(summary.path),
            registry=FirestoreRegistry(statedb.database(settings), settings.buckets.models),
            bus=PubsubBus(settings.project),
        )
    assert published.candidate is not None  # noqa: S101 (a succeeded report carries it)
    for name, value in published.candidate.metrics.items():
        metrics.log_metric(name, value)
    Path(report.path).write_text(
        json.dumps({"message_id": message_id, "report": published.model_dump(mode="json")}),
        encoding="utf-8",
    )
    report.metadata.update({"message_id": message_id, "topic": settings.topics.model_metrics})


def report_failure(
    *,
    config_yaml: str,
    model: str,
    run_id: str,
    request_id: str,
    reason: str,
    job_name: str = "",
    status: dsl.PipelineTaskFinalStatus,
) -> str:
    """Exit handler: publish ``status: failed`` when the run did not succeed; return the id."""
    if status.state == "SUCCEEDED":
        return ""  # the evaluate step published (and nothing is validated or read again)

    from components.runs import RunContext, failure_report
    from pipelines.runtime import load
    from retrain.bus import PubsubBus

    settings = load(config_yaml)
    run = RunContext.parse(model, run_id, request_id, reason, job_name)
    published = failure_report(
        settings, run, status.state, status.error_message or "", PubsubBus(settings.project)
    )
    return published[1] if published else ""


evaluate_op = build_component(evaluate_model)
report_failure_op = build_component(report_failure)
