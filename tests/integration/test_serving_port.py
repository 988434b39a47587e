"""The gatekeeper and the ``Serving`` port: what it asks to serve, and when (on the
emulators, with a recording adapter in place of a Vertex AI endpoint)."""

from __future__ import annotations

from typing import Any

import pytest

from retrain.bus import PubsubBus
from retrain.config import Settings
from retrain.ledger import GcsLedger
from retrain.messages import EvaluatedModel, MetricsReport
from retrain.service import RetrainService
from serving.registry import GcsRegistryWriter

pytestmark = pytest.mark.integration


class RecordingServing:
    """The Serving port; records each deploy it is asked for."""

    def __init__(self) -> None:
        self.deployed: list[tuple[str, str]] = []

    def deploy(self, model: str, version: str) -> None:
        self.deployed.append((model, version))


class NoLauncher:
    def submit(self, model: str, run_id: str) -> None:
        raise AssertionError(f"nothing was pending, yet {run_id} of {model} was launched")


def report(run_id: str, roc_auc: float, champion: str | None = None) -> MetricsReport:
    metrics = {"rows": 600.0, "accuracy": 0.80, "log_loss": 0.45, "roc_auc": roc_auc}
    return MetricsReport(
        model="rainfall", run_id=run_id, request_id=f"key-{run_id}", reason="data",
        status="succeeded",
        candidate=EvaluatedModel(artifact_uri=f"gs://a/{run_id}/model", metrics=metrics),
        champion=None if champion is None else EvaluatedModel(
            artifact_uri="gs://a/champion", version=champion, metrics={**metrics, "roc_auc": 0.75}
        ),
    )  # fmt: skip


def test_the_gatekeeper_serves_each_promotion_and_only_the_current_champion(
    settings: Settings, bucket: Any, publisher: Any
) -> None:
    registry = GcsRegistryWriter(bucket.name, bucket.client)
    serving = RecordingServing()
    service = RetrainService(
        settings, GcsLedger(bucket.name, bucket.client), NoLauncher(),
        PubsubBus(settings.project, publisher), registry, serving,
    )  # fmt: skip

    first = service.report(report("run-1", 0.80))
    better = report("run-2", 0.85, champion="1")
    second = service.report(better)
    worse = service.report(report("run-3", 0.60, champion="2"))

    assert (first.extra["verdict"], second.extra["verdict"]) == ("promoted", "promoted")
    assert worse.extra["verdict"] == "rejected"
    assert serving.deployed == [("rainfall", "1"), ("rainfall", "2")], "rejections deploy nothing"

    # An operator rolls back to v1; then run-2's report is delivered again.
    assert registry.promote("rainfall", "1", "2", by="ops", reason="rollback")
    service.report(better)
    assert serving.deployed == [("rainfall", "1"), ("rainfall", "2")], (
        "a redelivered old promotion must not undo the rollback on the endpoint"
    )

    # Once run-2's version is the champion again, a redelivery deploys it again: that is
    # how a deploy that failed on an earlier delivery is retried (deploy is idempotent).
    assert registry.promote("rainfall", "2", "1", by="ops", reason="forward again")
    service.report(better)
    assert serving.deployed[-1] == ("rainfall", "2")
