"""Turn an evaluation into a ``MetricsReport`` on ``model-metrics``.

Plain Python: the KFP wrappers call these, and so can anyone, outside any pipeline. The
ports (registry, bus) are passed in; the storage client picks the emulator by its env var.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.artifacts import EVAL_FILE, read_json
from components.evaluate.evaluation import ModelMetrics, evaluate
from components.runs import RunContext, publish_report, run_prefix
from retrain import blobstore
from retrain.bus import Bus
from retrain.config import Settings
from retrain.gatekeeper.registry import ModelRegistry
from retrain.messages import EvaluatedModel, MetricsReport

__all__ = ["evaluate_and_report"]


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
        if champion is None
        else EvaluatedModel(
            artifact_uri=champion.artifact_uri,
            version=champion.version,
            metrics=_metrics(result.champion) if result.champion else {},
            generation=champion.generation,
            missing_features=list(result.champion_missing),
        ),
        eval_data_uris=[eval_uri],
        train_data_uris=[str(i["uri"]) for i in inputs],
        train_rows={str(i["uri"]): int(i["rows"]) for i in inputs},
        window_rows=summary.get("window", {}).get("rows"),
        fit_rows=summary.get("train", {}).get("rows"),
    )
    return publish_report(settings, run, report, bus)
