"""Contract: :mod:`serving.vertex` through the real ``google-cloud-aiplatform`` SDK.

The SDK talks REST to :class:`FakeModelService` (Model Registry, endpoints, operations);
the GCS side of the registry is :class:`MemoryStorage`, an in-memory stand-in for the
storage client that enforces ``if_generation_match`` as GCS does, so the compare-and-swap
of ``champion.json`` is really exercised. The tests assert what the fake received.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.api_core.exceptions import NotFound, PreconditionFailed

from retrain.config import Settings
from retrain.ledger import event_hash
from serving.registry import RegistryError
from serving.vertex import DeployError, VertexEndpoint, VertexRegistry
from tests.contract.fake_model_service import Call, FakeModelService
from tests.contract.sdk_config import use_fake

pytestmark = pytest.mark.contract

MODEL = "churn"
PROJECT, REGION = "retrain-test", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
RESOURCE = f"{PARENT}/models/{MODEL}"
# Ours by default (serving/Dockerfile), in the project's Artifact Registry repository.
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/retrain/serving:latest"
RUN_A = "churn-20260101-030000-aaaaaa"
RUN_B = "churn-20260102-030000-bbbbbb"
RUN_C = "churn-20260103-030000-cccccc"
WAIT, POLL = 0.2, 0.01  # a deploy() call waits 0.2 s for its operation, asking every 10 ms


# -- GCS, in memory ------------------------------------------------------------------------


class MemoryStorage:
    """The part of ``google.cloud.storage.Client`` that the registry uses, in memory,
    with GCS's generation preconditions (``0`` means "create only")."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.lock = threading.Lock()
        self._generation = 0

    def bucket(self, name: str) -> MemoryBucket:
        return MemoryBucket(self, name)

    def list_blobs(self, bucket: str, prefix: str = "") -> list[MemoryBlob]:
        with self.lock:
            names = sorted(n for b, n in self.objects if b == bucket and n.startswith(prefix))
        return [MemoryBlob(self, bucket, name) for name in names]

    def json(self, uri: str) -> dict[str, Any]:
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        value: dict[str, Any] = json.loads(self.objects[(bucket, name)][0])
        return value

    def names(self, prefix: str) -> list[str]:
        return sorted(name for _, name in self.objects if name.startswith(prefix))

    def write(self, key: tuple[str, str], data: bytes, if_generation_match: int | None) -> int:
        with self.lock:
            current = self.objects.get(key)
            if if_generation_match is not None and if_generation_match != (
                current[1] if current else 0
            ):
                raise PreconditionFailed(f"gs://{key[0]}/{key[1]}: generation mismatch")
            self._generation += 1
            self.objects[key] = (data, self._generation)
            return self._generation


class MemoryBucket:
    def __init__(self, client: MemoryStorage, name: str) -> None:
        self.client = client
        self.name = name

    def blob(self, name: str) -> MemoryBlob:
        return MemoryBlob(self.client, self.name, name)


class MemoryBlob:
    def __init__(self, client: MemoryStorage, bucket: str, name: str) -> None:
        self.client = client
        self.key = (bucket, name)
        self.name = name
        self.generation: int | None = None

    def download_as_bytes(self) -> bytes:
        with self.client.lock:
            found = self.client.objects.get(self.key)
        if found is None:
            raise NotFound(f"gs://{self.key[0]}/{self.key[1]}")
        data, self.generation = found
        return data

    def upload_from_string(
        self, data: str | bytes, content_type: str | None = None,
        if_generation_match: int | None = None,
    ) -> None:  # fmt: skip
        raw = data.encode() if isinstance(data, str) else data
        self.generation = self.client.write(self.key, raw, if_generation_match)

    def delete(self, if_generation_match: int | None = None) -> None:
        with self.client.lock:
            found = self.client.objects.get(self.key)
            if found is None:
                raise NotFound(f"gs://{self.key[0]}/{self.key[1]}")
            if if_generation_match is not None and if_generation_match != found[1]:
                raise PreconditionFailed(f"gs://{self.key[0]}/{self.key[1]}: generation mismatch")
            del self.client.objects[self.key]


# -- fixtures --------------------------------------------------------------------------------


def make_settings(canary: int = 0) -> Settings:
    return Settings.model_validate(
        {
            "project": PROJECT,
            "region": REGION,
            "backend": "vertex",
            "buckets": {"data": "retrain-data", "artifacts": "retrain-artifacts"},
            "gcp": {
                "labels": {"team": "ml"},
                "endpoint": {
                    "machine_type": "n1-standard-4",
                    "min_replica_count": 1,
                    "max_replica_count": 3,
                    "canary_percent": canary,
                },
            },
            "models": {MODEL: {"data_prefix": "churn/", "label": "y", "order_column": "t"}},
        }
    )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeModelService]:
    """The fake, with the SDK pointed at it over REST, anonymously, in a fresh global
    config of the SDK (restored afterwards). Fails a test whose code called a route that
    the fake does not know."""
    with FakeModelService(PROJECT, REGION) as service:
        use_fake(monkeypatch, service.url, PROJECT, REGION)
        yield service
        assert service.unrouted == [], "calls that the fake has no route for"


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def registry(fake: FakeModelService, storage: MemoryStorage) -> VertexRegistry:
    return VertexRegistry(make_settings(), client=storage)


def record(run_id: str, roc_auc: float = 0.81234) -> dict[str, Any]:
    """A version record as the gatekeeper makes it (``RetrainService._version_record``)."""
    return {
        "model": MODEL,
        "artifact_uri": f"gs://retrain-artifacts/pipeline-root/{run_id}/train/model",
        "metrics": {"roc_auc": roc_auc, "accuracy": 0.9, "log_loss": 0.35, "rows": 2000.0},
        "run_id": run_id,
        "request_id": f"retrain-data/churn/{run_id}.csv#1767225600000000",
        "reason": "data",
        "lineage": {"train_data_uris": [], "train_rows": {}, "eval_data_uris": []},
        "verdict": None,
        "reasons": [],
    }


def of(calls: list[Call], verb: str) -> list[Call]:
    return [c for c in calls if c.verb == verb]


def index(calls: list[Call], predicate: Any) -> int:
    return next(i for i, c in enumerate(calls) if predicate(c))


def promoted(registry: VertexRegistry, run_id: str, expected: str | None) -> str:
    version, _ = registry.register(MODEL, record(run_id))
    assert registry.promote(MODEL, version, expected, by="test", reason=run_id)
    return version


# -- register --------------------------------------------------------------------------------


def test_register_uploads_one_version_per_run(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    assert registry.register(MODEL, record(RUN_A)) == ("1", True)
    assert registry.register(MODEL, record(RUN_B, 0.83)) == ("2", True)

    first, second = (c.body for c in of(fake.calls, "upload"))
    assert first["modelId"] == MODEL
    assert "parentModel" not in first
    assert second["parentModel"] == RESOURCE
    assert "modelId" not in second
    model = first["model"]
    assert model["displayName"] == MODEL
    assert model["artifactUri"] == record(RUN_A)["artifact_uri"]
    assert model["containerSpec"] == {
        "imageUri": IMAGE,
        # Vertex AI hands these to the container as AIP_PREDICT_ROUTE, AIP_HEALTH_ROUTE and
        # AIP_HTTP_PORT (serving.vertex_container serves there).
        "predictRoute": "/predict",
        "healthRoute": "/health",
        "ports": [{"containerPort": 8080}],
        "env": [
            {"name": "RETRAIN_MODEL", "value": MODEL},
            {"name": "RETRAIN_MODEL_VERSION", "value": "1"},
        ],
    }
    assert "versionAliases" not in model  # uploads never take "default" from the champion
    assert model["labels"] == {
        "team": "ml",
        "retrain_model": MODEL,
        "retrain_version": "1",
        "retrain_run": RUN_A,
        "retrain_request": event_hash(record(RUN_A)["request_id"]),
        "roc_auc": "0_8123",
        "accuracy": "0_9000",
        "log_loss": "0_3500",
        "rows": "2000",
    }
    assert "v1" in model["versionDescription"]
    assert RUN_A in model["versionDescription"]
    assert second["model"]["labels"]["retrain_run"] == RUN_B
    assert second["model"]["labels"]["roc_auc"] == "0_8300"

    # The GCS record keeps the join; GCS still answers champion/version reads.
    kept = storage.json(registry.version_uri(MODEL, "2"))
    assert (kept["vertex_model"], kept["vertex_version_id"]) == (RESOURCE, "2")
    assert fake.version(MODEL, "2")["labels"]["retrain_version"] == "2"
    found = registry.version(MODEL, "2")
    assert found is not None
    assert found.run_id == RUN_B


def test_redelivered_register_calls_vertex_not_at_all(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    registry.register(MODEL, record(RUN_A))
    before = len(fake.calls)

    assert registry.register(MODEL, record(RUN_A)) == ("1", False)
    assert fake.calls[before:] == []


def test_register_after_a_crash_finds_the_upload_by_its_run_label(
    registry: VertexRegistry,
    fake: FakeModelService,
    storage: MemoryStorage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("the function died after the upload")

    with monkeypatch.context() as patch:
        patch.setattr(VertexRegistry, "_join", crash)
        with pytest.raises(RuntimeError, match="died"):
            registry.register(MODEL, record(RUN_A))
    assert len(of(fake.calls, "upload")) == 1
    assert "vertex_version_id" not in storage.json(registry.version_uri(MODEL, "1"))
    before = len(fake.calls)

    assert registry.register(MODEL, record(RUN_A)) == ("1", False)
    again = fake.calls[before:]
    assert of(again, "upload") == []
    (lookup,) = of(again, "listVersions")
    assert lookup.query["filter"] == f'labels.retrain_run="{RUN_A}"'
    assert storage.json(registry.version_uri(MODEL, "1"))["vertex_version_id"] == "1"


def test_concurrent_deliveries_keep_one_vertex_version(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    registry.register(MODEL, record(RUN_A))
    with fake.uploads_meet(2), ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: registry.register(MODEL, record(RUN_B)), range(2)))

    # One version for both deliveries, created by one of them. GCS numbers it 2, or 3 if
    # the delivery that found 2 taken won the run's by-run record (the other then deletes
    # its own number): both orders happen, depending on the threads' timing.
    (version,) = {v for v, _ in results}
    assert sorted(created for _, created in results) == [False, True]
    assert version in ("2", "3")
    assert registry.version(MODEL, {"2": "3", "3": "2"}[version]) is None
    assert len(of(fake.calls, "upload")) == 3  # both deliveries of RUN_B uploaded ...
    (deleted,) = of(fake.calls, "deleteVersion")  # ... and the loser removed its own
    kept = storage.json(registry.version_uri(MODEL, version))["vertex_version_id"]
    (loser,) = {"2", "3"} - {kept}
    assert deleted.path == f"/v1/{RESOURCE}@{loser}:deleteVersion"
    survivors = [v for v in fake.models[MODEL].values() if v["labels"]["retrain_run"] == RUN_B]
    assert [v["versionId"] for v in survivors] == [kept]


def test_two_first_registrations_race_for_the_model_id(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    with fake.uploads_meet(2), ThreadPoolExecutor(2) as pool:
        results = sorted(
            pool.map(lambda run: registry.register(MODEL, record(run)), (RUN_A, RUN_B))
        )

    assert results == [("1", True), ("2", True)]
    uploads = of(fake.calls, "upload")
    assert [u.body.get("modelId") for u in uploads[:2]] == [MODEL, MODEL]
    assert uploads[2].body["parentModel"] == RESOURCE  # the loser of the id retried
    for version in ("1", "2"):
        kept = storage.json(registry.version_uri(MODEL, version))
        labels = fake.version(MODEL, kept["vertex_version_id"])["labels"]
        assert (labels["retrain_run"], labels["retrain_version"]) == (kept["run_id"], version)


# -- promote -----------------------------------------------------------------------------------


def test_promote_moves_champion_and_default_to_the_new_version(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    promoted(registry, RUN_A, None)
    registry.register(MODEL, record(RUN_B))
    before = len(fake.calls)

    assert registry.promote(MODEL, "2", "1", by="gatekeeper", reason=f"run {RUN_B}")

    calls = fake.calls[before:]
    # Vertex's alias was read before anything moved, and moved once GCS had swapped.
    look = index(calls, lambda c: c.method == "GET" and c.path.endswith(f"{MODEL}@champion"))
    (merge,) = of(calls, "mergeVersionAliases")
    assert look < calls.index(merge)
    assert merge.path.endswith(f"/models/{MODEL}@2:mergeVersionAliases")
    assert merge.body == {"versionAliases": ["champion", "default"]}
    assert fake.alias_holder(MODEL, "champion") == "2"
    assert fake.alias_holder(MODEL, "default") == "2"
    assert fake.version(MODEL, "1")["versionAliases"] == []  # taken from the old one
    champion = registry.champion(MODEL)
    assert champion is not None
    assert champion.version == "2"
    audit = storage.names(f"registry/{MODEL}/audit/")
    assert len(audit) == 2
    assert storage.json(f"gs://retrain-artifacts/{audit[-1]}")["from"] == "1"


def test_a_stale_promote_moves_no_alias(registry: VertexRegistry, fake: FakeModelService) -> None:
    promoted(registry, RUN_A, None)
    registry.register(MODEL, record(RUN_B))
    before = len(fake.calls)

    assert not registry.promote(MODEL, "2", None, by="gatekeeper", reason="compared with none")
    assert fake.mutations(before) == []
    assert fake.alias_holder(MODEL, "champion") == "1"
    champion = registry.champion(MODEL)
    assert champion is not None
    assert champion.version == "1"


def test_an_alias_moved_by_hand_makes_promote_stale_until_adopted(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    aiplatform = importlib.import_module("google.cloud.aiplatform")
    promoted(registry, RUN_A, None)
    registry.register(MODEL, record(RUN_B))
    registry.register(MODEL, record(RUN_C))
    # Someone moves the champion to v2 in the console.
    aiplatform.models.ModelRegistry(RESOURCE).add_version_aliases(["champion"], "2")
    pointer = storage.json(registry.champion_uri(MODEL))
    before = len(fake.calls)

    assert not registry.promote(MODEL, "3", "1", by="gatekeeper", reason=f"run {RUN_C}")
    assert fake.mutations(before) == []
    assert storage.json(registry.champion_uri(MODEL)) == pointer  # GCS did not move either
    assert not registry.sync_champion(MODEL)  # nor does a redelivery overwrite the console
    assert fake.mutations(before) == []

    # An operator adopts what the console says: GCS follows, the aliases stay together.
    assert registry.promote(MODEL, "2", "1", by="operator", reason="as set in the console")
    assert (fake.alias_holder(MODEL, "champion"), fake.alias_holder(MODEL, "default")) == (
        "2",
        "2",
    )


def test_a_promotion_that_died_before_the_alias_move_is_finished(
    registry: VertexRegistry, fake: FakeModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    promoted(registry, RUN_A, None)
    registry.register(MODEL, record(RUN_B))

    def crash(self: VertexRegistry, model: str) -> None:
        raise RuntimeError("the function died after the GCS swap")

    with monkeypatch.context() as patch:
        patch.setattr(VertexRegistry, "_project", crash)
        with pytest.raises(RuntimeError, match="died"):
            registry.promote(MODEL, "2", "1", by="gatekeeper", reason=f"run {RUN_B}")
    assert fake.alias_holder(MODEL, "champion") == "1"  # Vertex lags behind GCS

    # The redelivered decision, which deploys the champion, finishes it ...
    VertexEndpoint(make_settings(), registry).deploy(MODEL, "2")
    assert fake.alias_holder(MODEL, "champion") == "2"
    assert serving(fake) == {"2": 100}
    assert registry.sync_champion(MODEL)
    # ... and a lagging alias does not block the next promotion either.
    with monkeypatch.context() as patch:
        patch.setattr(VertexRegistry, "_project", crash)
        with pytest.raises(RuntimeError, match="died"):
            promoted(registry, RUN_C, "2")
    assert registry.promote(MODEL, "1", "3", by="operator", reason="rollback: v3 is bad")
    assert fake.alias_holder(MODEL, "champion") == "1"


def test_promote_of_an_unknown_version_is_an_error(registry: VertexRegistry) -> None:
    with pytest.raises(RegistryError, match="churn has no version 7"):
        registry.promote(MODEL, "7", None, by="operator", reason="typo")


# -- deploy ------------------------------------------------------------------------------------


def endpoint_of(fake: FakeModelService) -> dict[str, Any]:
    return fake.endpoint_state(f"retrain-{MODEL}")


def serving(fake: FakeModelService) -> dict[str, int]:
    """Vertex version id -> traffic share."""
    state = endpoint_of(fake)
    split = state["trafficSplit"]
    assert set(split) <= {d["id"] for d in state["deployedModels"]}
    return {d["modelVersionId"]: split.get(d["id"], 0) for d in state["deployedModels"]}


def vertex_endpoint(registry: VertexRegistry, canary: int = 0) -> VertexEndpoint:
    return VertexEndpoint(make_settings(canary), registry, wait_seconds=WAIT, poll_seconds=POLL)


def deploy_record(storage: MemoryStorage) -> dict[str, Any] | None:
    """``registry/<model>/deploy.json``: the endpoint change under way, if any."""
    key = ("retrain-artifacts", f"registry/{MODEL}/deploy.json")
    with storage.lock:
        found = storage.objects.get(key)
    return None if found is None else storage.json(f"gs://{key[0]}/{key[1]}")


def polls_of(calls: list[Call], operation: str) -> list[int]:
    """The indexes of the calls that asked for ``operation``."""
    return [i for i, c in enumerate(calls) if c.method == "GET" and c.path.endswith(operation)]


def deployed_id(fake: FakeModelService, version_id: str) -> str:
    (found,) = [
        d["id"] for d in endpoint_of(fake)["deployedModels"] if d["modelVersionId"] == version_id
    ]
    return str(found)


def test_deploy_replaces_the_old_version_only_after_the_new_one_serves(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    endpoint = vertex_endpoint(registry, canary=0)
    promoted(registry, RUN_A, None)
    endpoint.deploy(MODEL, "1")

    (created,) = [c for c in fake.mutations() if c.path == f"/v1/{PARENT}/endpoints"]
    assert created.body == {
        "displayName": f"retrain-{MODEL}",
        "labels": {"team": "ml", "retrain_model": MODEL},
    }
    (first,) = of(fake.calls, "deployModel")
    assert first.body["trafficSplit"] == {"0": 100}
    deployed = first.body["deployedModel"]
    assert deployed["model"] == f"{RESOURCE}@1"
    assert deployed["displayName"] == f"{MODEL}-v1"
    assert deployed["dedicatedResources"] == {
        "machineSpec": {"machineType": "n1-standard-4"},
        "minReplicaCount": 1,
        "maxReplicaCount": 3,
    }
    old = deployed_id(fake, "1")

    promoted(registry, RUN_B, "1")
    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")

    calls = fake.calls[before:]
    (deploy,) = of(calls, "deployModel")
    (undeploy,) = of(calls, "undeployModel")
    assert deploy.body["trafficSplit"] == {"0": 100}
    assert undeploy.body["deployedModelId"] == old
    assert undeploy.body.get("trafficSplit") == {deployed_id(fake, "2"): 100}
    # The order: deploy, its operation polled until done, and only then the undeploy.
    polled = index(calls, lambda c: c.method == "GET" and "/operations/" in c.path)
    assert calls.index(deploy) < polled < calls.index(undeploy)
    assert serving(fake) == {"2": 100}

    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")  # a redelivered decision
    assert fake.mutations(before) == []
    assert len(fake.endpoints) == 1


def test_canary_splits_traffic_and_rollback_moves_it_back(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    endpoint = vertex_endpoint(registry, canary=10)
    promoted(registry, RUN_A, None)
    endpoint.deploy(MODEL, "1")  # nothing serves yet: the first version takes everything
    assert serving(fake) == {"1": 100}
    first = deployed_id(fake, "1")

    promoted(registry, RUN_B, "1")
    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")
    (deploy,) = of(fake.mutations(before), "deployModel")
    assert deploy.body["trafficSplit"] == {"0": 10, first: 90}
    assert of(fake.mutations(before), "undeployModel") == []
    assert serving(fake) == {"1": 90, "2": 10}

    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")  # a redelivered decision
    assert fake.mutations(before) == []

    # Rollback = promote the older version, then deploy it: it still serves, so only the
    # traffic moves (no second deployment), then the bad version goes.
    assert registry.promote(MODEL, "1", "2", by="operator", reason="rollback: v2 misbehaves")
    assert fake.alias_holder(MODEL, "champion") == "1"
    canary = deployed_id(fake, "2")
    before = len(fake.calls)
    endpoint.deploy(MODEL, "1")
    calls = fake.mutations(before)
    assert [(c.method, c.verb) for c in calls] == [("PATCH", ""), ("POST", "undeployModel")]
    assert calls[0].query["updateMask"] in ("trafficSplit", "traffic_split")
    assert calls[0].body["trafficSplit"] == {first: 100}
    assert calls[1].body["deployedModelId"] == canary
    assert serving(fake) == {"1": 100}
    assert deployed_id(fake, "1") == first


def test_rollback_to_an_undeployed_version_deploys_it_in_full(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    endpoint = vertex_endpoint(registry, canary=10)
    for run, expected, version in ((RUN_A, None, "1"), (RUN_B, "1", "2"), (RUN_C, "2", "3")):
        promoted(registry, run, expected)
        endpoint.deploy(MODEL, version)
    assert serving(fake) == {"2": 90, "3": 10}  # v1 went when v3 arrived

    assert registry.promote(MODEL, "1", "3", by="operator", reason="rollback: to v1")
    before = len(fake.calls)
    endpoint.deploy(MODEL, "1")
    calls = fake.mutations(before)
    assert [c.verb for c in calls] == ["deployModel", "undeployModel", "undeployModel"]
    assert calls[0].body["trafficSplit"] == {"0": 100}  # a rollback is never a canary
    assert serving(fake) == {"1": 100}


def test_a_deployment_that_outlasts_the_wait_is_finished_by_the_next_call(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, None)
    endpoint.deploy(MODEL, "1")
    old = deployed_id(fake, "1")
    promoted(registry, RUN_B, "1")
    fake.hold("deployModel")  # a deployment takes 10-30 minutes, a function 540 s at most
    before = len(fake.calls)

    started = time.monotonic()
    endpoint.deploy(MODEL, "2")  # returns; the deployment goes on in Vertex AI
    assert time.monotonic() - started < 5  # WAIT (0.2 s), with room for a loaded machine

    (deploy,) = of(fake.mutations(before), "deployModel")
    assert deploy.body["trafficSplit"] == {"0": 100}
    assert of(fake.mutations(before), "undeployModel") == []  # v1 still serves everything
    operation = fake.operations_of("deployModel")[-1]
    assert not operation.done
    assert operation.polls >= 2  # waited for it, a bounded while
    kept = deploy_record(storage)
    assert kept is not None
    assert kept["started_at"]
    assert {k: v for k, v in kept.items() if k != "started_at"} == {
        "version": "2",
        "vertex_version_id": "2",
        "endpoint": endpoint_of(fake)["name"],
        "phase": "deploying",
        "operation": operation.name,
        "deployed_model_display_name": f"{MODEL}-v2",
        "deployed_model_id": None,
        "traffic_split": {"0": 100},
        "undeploy": [old],
        "undeploy_operations": {},
    }
    assert serving(fake) == {"1": 100}

    # A redelivered decision waits for the same operation; it sends no second DeployModel
    # (nor anything else), although the endpoint does not list the model in flight.
    before, polls = len(fake.calls), operation.polls
    endpoint.deploy(MODEL, "2")
    assert fake.mutations(before) == []
    assert operation.polls > polls
    assert deploy_record(storage) == kept

    # Vertex AI finishes it; the next call sees it done and only then undeploys v1.
    fake.release("deployModel")
    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")
    calls = fake.calls[before:]
    assert of(calls, "deployModel") == []
    (undeploy,) = of(calls, "undeployModel")
    assert undeploy.body["deployedModelId"] == old
    assert polls_of(calls, operation.name)[0] < calls.index(undeploy)
    assert fake.operations[operation.name].done  # (by then, as that first poll answered)
    assert serving(fake) == {"2": 100}
    assert deploy_record(storage) is None

    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")  # and then a repeat is a no-op again
    assert fake.mutations(before) == []


def test_another_version_is_refused_while_a_deployment_is_in_flight(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, None)
    endpoint.deploy(MODEL, "1")
    first = deployed_id(fake, "1")
    promoted(registry, RUN_B, "1")
    fake.hold("deployModel")
    endpoint.deploy(MODEL, "2")
    in_flight = deploy_record(storage)
    assert in_flight is not None
    assert in_flight["phase"] == "deploying"

    # The next promotion, and a rollback to v1 (which would only move traffic): both fail,
    # naming the version in flight, and change nothing; Pub/Sub (or the operator) retries.
    promoted(registry, RUN_C, "2")
    before = len(fake.calls)
    for version in ("3", "1"):
        with pytest.raises(DeployError, match=r"v2 \(Vertex version 2\) is still being deployed"):
            endpoint.deploy(MODEL, version)
    assert fake.mutations(before) == []
    assert deploy_record(storage) == in_flight

    # Once v2 serves, the retried v3 first finishes v2's change (v1 goes), then deploys.
    fake.release("deployModel")
    before = len(fake.calls)
    endpoint.deploy(MODEL, "3")
    calls = fake.mutations(before)
    assert [c.verb for c in calls] == ["undeployModel", "deployModel", "undeployModel"]
    assert calls[0].body["deployedModelId"] == first
    assert calls[1].body["deployedModel"]["model"] == f"{RESOURCE}@3"
    assert serving(fake) == {"3": 100}
    assert deploy_record(storage) is None


def test_a_failed_deployment_raises_and_clears_its_record(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, None)
    endpoint.deploy(MODEL, "1")
    promoted(registry, RUN_B, "1")
    fake.fail("deployModel", "the container did not become healthy")
    before = len(fake.calls)

    with pytest.raises(DeployError, match=r"v2 .*failed.*did not become healthy \(code 9\)"):
        endpoint.deploy(MODEL, "2")
    assert deploy_record(storage) is None
    assert of(fake.mutations(before), "undeployModel") == []
    assert serving(fake) == {"1": 100}  # the old version goes on serving

    # A failure that happens after the call returned is raised by the next call.
    fake.hold("deployModel")
    endpoint.deploy(MODEL, "2")
    assert deploy_record(storage) is not None
    fake.release("deployModel")
    with pytest.raises(DeployError, match="did not become healthy"):
        endpoint.deploy(MODEL, "2")
    assert deploy_record(storage) is None

    # The retry (Pub/Sub redelivers) deploys it afresh.
    fake.fail("deployModel", None)
    endpoint.deploy(MODEL, "2")
    assert len(of(fake.mutations(before), "deployModel")) == 3
    assert serving(fake) == {"2": 100}
    assert deploy_record(storage) is None


def test_an_undeploy_in_flight_is_not_sent_twice(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, None)
    endpoint.deploy(MODEL, "1")
    old = deployed_id(fake, "1")
    promoted(registry, RUN_B, "1")
    fake.hold("undeployModel")

    endpoint.deploy(MODEL, "2")  # v2 serves; undeploying v1 goes on
    (undeploy,) = fake.operations_of("undeployModel")
    kept = deploy_record(storage)
    assert kept is not None
    assert kept["phase"] == "undeploying"
    assert kept["deployed_model_id"] == deployed_id(fake, "2")
    assert kept["undeploy_operations"] == {old: undeploy.name}
    assert serving(fake) == {"1": 0, "2": 100}

    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")
    assert fake.mutations(before) == []
    fake.release("undeployModel")
    endpoint.deploy(MODEL, "2")
    assert fake.mutations(before) == []
    assert serving(fake) == {"2": 100}
    assert deploy_record(storage) is None


def test_a_deployment_being_started_elsewhere_is_left_to_that_call(
    registry: VertexRegistry, fake: FakeModelService, storage: MemoryStorage
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, None)
    claim = {"version": "1", "vertex_version_id": "1", "phase": "starting", "operation": None,
             "started_at": datetime.now(UTC).isoformat()}  # fmt: skip
    uri = registry.deploy_uri(MODEL)
    registry.write_deploy_record(MODEL, claim, 0)
    before = len(fake.calls)

    with pytest.raises(DeployError, match="another call is starting the deployment of v1"):
        endpoint.deploy(MODEL, "1")
    assert of(fake.mutations(before), "deployModel") == []
    assert storage.json(uri) == claim

    # A claim that never got its operation within minutes belongs to a call that died.
    found = registry.deploy_record(MODEL)
    assert found is not None
    stale = {**claim, "started_at": (datetime.now(UTC) - timedelta(minutes=10)).isoformat()}
    registry.write_deploy_record(MODEL, stale, found[1])
    endpoint.deploy(MODEL, "1")
    assert len(of(fake.mutations(before), "deployModel")) == 1
    assert serving(fake) == {"1": 100}
    assert deploy_record(storage) is None
