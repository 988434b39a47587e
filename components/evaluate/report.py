"""Turn an evaluation into a ``MetricsReport`` on ``model-metrics`` (and a failure into one too).

Plain Python: the KFP wrappers call these, and so can anyone, outside any pipeline. The
ports (registry, bus) are passed in; the storage client picks the emulator by its env var.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from google.api_core.exceptions import PreconditionFailed

from components.artifacts import EVAL_FILE, read_json
from components.evaluate.evaluation import ModelMetrics, evaluate
from retrain import blobstore
from retrain.bus import Bus
from retrain.config import Settings
from retrain.messages import EvaluatedModel, MetricsReport
from serving.registry import ModelRegistry

__all__ = [
    "RunContext",
    "evaluate_and_report",
    "failure_report",
    "read_failure",
    "record_failure",
    "report_uri",
    "run_prefix",
]

Reason = Literal["data", "drift", "schedule", "manual"]
REASONS: tuple[Reason, ...] = get_args(Reason)


@dataclass(frozen=True)
class RunContext:
    """Which run this is, and for which request."""

    model: str
    run_id: str
    request_id: str
    reason: Reason

    @classmethod
    def parse(cls, model: str, run_id: str, request_id: str, reason: str) -> RunContext:
        """From pipeline parameters (plain strings); an unknown reason is an error."""
        for known in REASONS:
            if reason == known:
                return cls(model, run_id, request_id, known)
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")


def run_prefix(settings: Settings, run: RunContext) -> str:
    """Where a run keeps what outlives it: the candidate model, eval rows, its error."""
    return f"gs://{settings.buckets.artifacts}/runs/{run.model}/{run.run_id}"


def _metrics(metrics: ModelMetrics) -> dict[str, float]:
    return {name: float(value) for name, value in asdict(metrics).items()}


def evaluate_and_report(
    settings: Settings,
    run: RunContext,
    *,
    model_dir: Path,
    eval_path: Path,
    summary_path: Path,
    registry: ModelRegistry,
    bus: Bus,
) -> tuple[MetricsReport, str]:
    """Score the candidate and the champion on the same rows; publish; return report and id.

    The candidate model and the evaluation rows are uploaded under :func:`run_prefix`, so
    the report names objects that the gatekeeper and the registry can reach.
    """
    champion = registry.champion(run.model)
    with tempfile.TemporaryDirectory() as tmp:
        champion_dir = None
        if champion is not None:
            champion_dir = Path(tmp) / "champion"
            blobstore.download_dir(champion.artifact_uri, champion_dir)
        result = evaluate(model_dir, eval_path, champion_dir)
    prefix = run_prefix(settings, run)
    artifact_uri = blobstore.join(prefix, "model")
    blobstore.upload_dir(model_dir, artifact_uri)
    eval_uri = blobstore.upload_file(eval_path, blobstore.join(prefix, EVAL_FILE))
    summary: dict[str, Any] = read_json(summary_path)
    inputs = summary.get("inputs", [])
    report = MetricsReport(
        model=run.model,
        run_id=run.run_id,
        request_id=run.request_id,
        reason=run.reason,
        status="succeeded",
        candidate=EvaluatedModel(artifact_uri=artifact_uri, metrics=_metrics(result.candidate)),
        champion=None
        if champion is None or result.champion is None
        else EvaluatedModel(
            artifact_uri=champion.artifact_uri,
            version=champion.version,
            metrics=_metrics(result.champion),
        ),
        eval_data_uris=[eval_uri],
        train_data_uris=[str(i["uri"]) for i in inputs],
        train_rows={str(i["uri"]): int(i["rows"]) for i in inputs},
    )
    return report, _publish(settings, run, report, bus)


def _publish(settings: Settings, run: RunContext, report: MetricsReport, bus: Bus) -> str:
    """Publish ``report`` and keep it, with its message id, as the run's ``report.json``."""
    message_id = bus.publish(settings.topics.model_metrics, report, model=run.model)
    record = {"message_id": message_id, "report": report.model_dump(mode="json")}
    blobstore.write_bytes(report_uri(settings, run), json.dumps(record, indent=2).encode())
    return message_id


def report_uri(settings: Settings, run: RunContext) -> str:
    """The run's published report and its message id: the audit trail of the run."""
    return blobstore.join(run_prefix(settings, run), "report.json")


def record_failure(settings: Settings, run: RunContext, step: str, error: BaseException) -> None:
    """Keep a step's error where the exit handler finds it (the first failure wins)."""
    record = {"step": step, "error": f"{type(error).__name__}: {error}"}
    with contextlib.suppress(PreconditionFailed):  # an earlier step's error is kept
        blobstore.write_bytes(
            blobstore.join(run_prefix(settings, run), "error.json"),
            json.dumps(record).encode(),
            if_generation_match=0,
        )


def read_failure(settings: Settings, run: RunContext) -> dict[str, str] | None:
    data = blobstore.read_bytes(blobstore.join(run_prefix(settings, run), "error.json"))
    if data is None:
        return None
    value = json.loads(data)
    return {"step": str(value.get("step", "")), "error": str(value.get("error", ""))}


def failure_report(
    settings: Settings, run: RunContext, state: str, fallback_error: str, bus: Bus
) -> tuple[MetricsReport, str] | None:
    """Publish ``status: failed`` unless the run succeeded; None if there was nothing to do."""
    if state == "SUCCEEDED":
        return None
    failure = read_failure(settings, run)
    report = MetricsReport(
        model=run.model,
        run_id=run.run_id,
        request_id=run.request_id,
        reason=run.reason,
        status="failed",
        error=failure["error"] if failure else (fallback_error or f"the run ended {state}"),
        failed_step=failure["step"] if failure else None,
    )
    return report, _publish(settings, run, report, bus)
