"""The prediction server on the real stack: champions in the registry (Firestore, models in
fake-gcs-server), decisions on Pub/Sub."""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from components.train import train
from retrain import blobstore
from retrain.config import ModelSettings, Settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.localstack import Stack
from retrain.messages import Decision, encode
from retrain.statedb import Database
from serving.app import create_app
from serving.models import ChampionWatcher, ModelStore
from tests.conftest import unique

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 but works with httpx; the warning is about packaging only.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "data" / "rainfall.csv.gz"
SPEC = ModelSettings.model_validate(
    {
        "data_prefix": "serving-test/",
        "label": "rain",
        "order_column": "day",
        "estimator": {"name": "HistGradientBoostingClassifier", "params": {"max_iter": 20}},
    }
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    rainfall = pd.read_csv(DATA, nrows=1200).rename(columns={"Unnamed: 0": "day"})
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for i, rows in enumerate((rainfall.iloc[:600], rainfall.iloc[600:]), start=1):
        data = root / f"train-{i}.parquet"
        rows.to_parquet(data)
        dirs.append(train(data, SPEC, root / f"v{i}").model_path.parent)
    return dirs


@pytest.fixture
def emulator_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Google clients made inside the server find the emulators by environment only."""
    env = stack.env()
    for name in (
        "PUBSUB_EMULATOR_HOST",
        "PUBSUB_PROJECT_ID",
        "STORAGE_EMULATOR_HOST",
        "GOOGLE_CLOUD_PROJECT",
    ):
        monkeypatch.setenv(name, env[name])


@pytest.fixture
def model_name(stack: Stack, db: Database, gcs: Any) -> Iterator[str]:
    """A uuid-named model; its registry records and uploaded folders are deleted after."""
    name = unique("serving")
    yield name
    db.client.recursive_delete(db.doc("registry", name))
    for blob in gcs.list_blobs(stack.settings.buckets.models, prefix=f"{name}/"):
        blob.delete()


@pytest.fixture
def decisions_subscription(stack: Stack, subscriber: Any) -> Iterator[str]:
    project = stack.settings.project
    name = unique(f"{stack.settings.topics.model_decisions}-serving")
    path = subscriber.subscription_path(project, name)
    subscriber.create_subscription(
        name=path, topic=f"projects/{project}/topics/{stack.settings.topics.model_decisions}"
    )
    yield name
    subscriber.delete_subscription(subscription=path)


def register(registry: FirestoreRegistry, gcs: Any, model: str, folder: Path) -> str:
    """Upload ``folder`` into the registry bucket, register it as a new version and move the
    champion to it, as the gatekeeper does; the version."""
    run_id = uuid.uuid4().hex
    artifact = f"gs://{registry.bucket}/{model}/{run_id}/model"
    blobstore.upload_dir(folder, artifact, gcs)
    version = registry.register(model, {"run_id": run_id, "artifact_uri": artifact,
                                        "metrics": {}})  # fmt: skip
    assert registry.promote(model, version, registry.pointer(model).generation, "test", "serve")
    return version


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.usefixtures("emulator_env")
def test_a_promoted_decision_swaps_the_served_champion(
    stack: Stack,
    gcs: Any,
    registry: FirestoreRegistry,
    publisher: Any,
    model_dirs: list[Path],
    model_name: str,
    decisions_subscription: str,
    tmp_path: Path,
) -> None:
    settings: Settings = stack.settings.model_copy(update={"models": {model_name: SPEC}})
    assert register(registry, gcs, model_name, model_dirs[0]) == "1"
    store = ModelStore(settings.models, registry, blobstore.download_dir, tmp_path / "cache")
    # Polling is slow on purpose: the swap below has to come from the decision.
    watcher = ChampionWatcher(store, settings.project, decisions_subscription, poll_seconds=300)
    base = f"/v1/projects/{settings.project}/locations/{settings.region}"
    predict = f"{base}/endpoints/{model_name}:predict"
    features = json.loads((model_dirs[0] / "metadata.json").read_text())["features"]
    instance = dict.fromkeys(features, 0.5)

    with TestClient(create_app(settings, store, watcher=watcher)) as client:
        assert client.get("/healthz").json()["models"] == {model_name: "1"}
        first = client.post(predict, json={"instances": [instance]})
        assert first.status_code == 200, first.text
        assert first.json()["modelVersionId"] == "1"
        assert watcher.listening.wait(30), "the streaming pull did not start"
        assert watcher.running()

        assert register(registry, gcs, model_name, model_dirs[1]) == "2"
        decision = Decision(
            model=model_name,
            run_id="run-2",
            verdict="promoted",
            reasons=["roc_auc improved"],
            new_version="2",
            previous_champion="1",
        )
        topic = publisher.topic_path(settings.project, settings.topics.model_decisions)
        publisher.publish(topic, encode(decision)).result(timeout=30)

        def swapped() -> bool:
            body = client.post(predict, json={"instances": [instance]}).json()
            return bool(body["modelVersionId"] == "2")

        assert wait_for(swapped, timeout=10), "the server did not swap to version 2"
        assert client.get(f"{base}/endpoints/{model_name}").json()["trafficSplit"] == {"2": 100}
        pinned = client.post(
            f"{base}/models/{model_name}@1:predict", json={"instances": [instance]}
        )
        assert pinned.json()["modelVersionId"] == "1"
    assert not watcher.running()
