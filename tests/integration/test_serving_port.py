"""The gatekeeper and the ``Serving`` port: what it asks to serve, and when (on the
emulators, with a recording adapter in place of a Vertex AI endpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from retrain import blobstore
from retrain.bus import PubsubBus
from retrain.config import Settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger, RunRecord
from retrain.messages import EvaluatedModel, MetricsReport
from retrain.service import RetrainService
from retrain.statedb import Database
from tests.conftest import unique

pytestmark = pytest.mark.integration


class RecordingServing:
    """The Serving port; records each deploy it is asked for."""

    def __init__(self) -> None:
        self.deployed: list[tuple[str, str]] = []
        self.shares: list[int | None] = []

    def deploy(self, model: str, version: str, share: int | None = None) -> None:
        self.deployed.append((model, version))
        self.shares.append(share)


class NoLauncher:
    def submit(self, model: str, run_id: str) -> None:
        raise AssertionError(f"nothing was pending, yet {run_id} of {model} was launched")

    def state(self, model: str, run: RunRecord) -> Any:
        raise AssertionError(f"no lease was looked at, yet {run.run_id} of {model} was")

    def scheduled(self, model: str, run_id: str) -> bool:
        raise AssertionError(f"no model has a pipeline schedule, yet {run_id} of {model} was")


@pytest.fixture
def model(settings: Settings, db: Database, gcs: Any) -> Iterator[str]:
    """A uuid-named model (the rainfall spec), with nothing of its own left behind."""
    name = unique("port")
    yield name
    for collection in ("ledger", "registry"):
        db.client.recursive_delete(db.doc(collection, name))
    for bucket in (settings.buckets.artifacts, settings.buckets.models):
        prefix = f"runs/{name}/" if bucket == settings.buckets.artifacts else f"{name}/"
        for blob in gcs.list_blobs(bucket, prefix=prefix):
            blob.delete()


def launched(settings: Settings, ledger: FirestoreLedger, gcs: Any, model: str, run_id: str) -> str:
    """Run ``run_id`` as the ledger launches one (lease, record, started), with a candidate
    under its own prefix; the candidate's URI."""
    spec = settings.models[model]
    assert ledger.acquire(model, run_id, spec.lease_seconds).acquired
    ledger.start(model, run_id, [f"gs://{settings.buckets.data}/{spec.data_prefix}x.csv"])
    candidate = f"{settings.run_prefix(model, run_id)}/model"
    blobstore.write_bytes(f"{candidate}/model.joblib", run_id.encode(), gcs)
    return candidate


def report(
    model: str, run_id: str, candidate: str, roc_auc: float, champion: tuple[str, int] | None
) -> MetricsReport:
    """``champion``: the version the run was evaluated against, and the pointer's generation."""
    metrics = {"rows": 600.0, "accuracy": 0.80, "log_loss": 0.45, "roc_auc": roc_auc}
    return MetricsReport(
        model=model, run_id=run_id, request_id=f"key-{run_id}", reason="data",
        status="succeeded",
        candidate=EvaluatedModel(artifact_uri=candidate, metrics=metrics),
        champion=None if champion is None else EvaluatedModel(
            artifact_uri="gs://a/champion", version=champion[0], generation=champion[1],
            metrics={**metrics, "roc_auc": 0.75},
        ),
    )  # fmt: skip


def test_the_gatekeeper_serves_each_promotion_and_only_the_current_champion(
    settings: Settings, db: Database, gcs: Any, publisher: Any, model: str
) -> None:
    spec = settings.models["rainfall"].model_copy(update={"data_prefix": f"{model}/"})
    settings = settings.model_copy(update={"models": {model: spec}})
    ledger = FirestoreLedger(db)
    registry = FirestoreRegistry(db, settings.buckets.models, gcs)
    serving = RecordingServing()
    service = RetrainService(
        settings, ledger, NoLauncher(), PubsubBus(settings.project, publisher), registry, serving
    )

    first = service.report(report(model, "run-1", launched(settings, ledger, gcs, model, "run-1"),
                                  0.80, None))  # fmt: skip
    better = report(model, "run-2", launched(settings, ledger, gcs, model, "run-2"), 0.85, ("1", 1))
    second = service.report(better)
    worse = service.report(
        report(model, "run-3", launched(settings, ledger, gcs, model, "run-3"), 0.60, ("2", 2))
    )

    assert (first.action, second.action, worse.action) == ("decided",) * 3, worse.detail
    assert (first.extra["verdict"], second.extra["verdict"]) == ("promoted", "promoted")
    assert worse.extra["verdict"] == "rejected"
    assert serving.deployed == [(model, "1"), (model, "2")], "rejections deploy nothing"
    assert ledger.lease(model) is None, "each decision released its run's lease"

    # An operator rolls back to v1; then run-2's report is delivered again.
    assert registry.rollback(model, registry.pointer(model).generation, "ops", "rollback") == "1"
    again = service.report(better)
    assert again.extra["verdict"] == "promoted", "the kept decision, not a new one"
    assert serving.deployed == [(model, "1"), (model, "2")], (
        "a redelivered old promotion must not undo the rollback on the endpoint"
    )

    # Once run-2's version is the champion again, a redelivery deploys it again: that is
    # how a deploy that failed on an earlier delivery is retried (deploy is idempotent).
    assert registry.promote(model, "2", registry.pointer(model).generation, "ops", "forward")
    service.report(better)
    assert serving.deployed[-1] == (model, "2")
    assert len(serving.deployed) == 3


def test_a_report_of_a_run_the_ledger_never_launched_serves_nothing(
    settings: Settings, db: Database, gcs: Any, publisher: Any, model: str
) -> None:
    """A forged report (no run of the ledger's) is refused: nothing is registered, the
    champion does not move, nothing is deployed."""
    spec = settings.models["rainfall"].model_copy(update={"data_prefix": f"{model}/"})
    settings = settings.model_copy(update={"models": {model: spec}})
    registry = FirestoreRegistry(db, settings.buckets.models, gcs)
    serving = RecordingServing()
    service = RetrainService(
        settings, FirestoreLedger(db), NoLauncher(), PubsubBus(settings.project, publisher),
        registry, serving,
    )  # fmt: skip
    candidate = f"{settings.run_prefix(model, 'forged')}/model"

    outcome = service.report(report(model, "forged", candidate, 0.99, None))

    assert outcome.action == "refused"
    assert "was not launched by the ledger" in outcome.detail
    assert serving.deployed == []
    assert registry.champion(model) is None
    assert registry.records(model) == []
    assert [r["run_id"] for r in registry.refused(model)] == ["forged"]
