"""Contract: :mod:`retrain.gatekeeper.vertex` and :mod:`serving.vertex_endpoint` through
the real ``google-cloud-aiplatform`` SDK and the real Firestore emulator.

The SDK talks REST to :class:`FakeModelService` (Model Registry, endpoints, operations).
The registry's records (the versions, the champion pointer with its generation and
history, the audit trail, and the Vertex ``sync`` and ``deploy`` records) are documents in
a fresh uuid-named database of the test stack's Firestore emulator (the session ``db``'s),
so the compare-and-swap of the champion pointer and of the deploy record is really
Firestore's. The tests assert what the fake received and what Firestore keeps.
"""

from __future__ import annotations

import importlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from retrain.config import Settings
from retrain.gatekeeper.policy import Pointer
from retrain.gatekeeper.registry import RegistryError
from retrain.gatekeeper.vertex import VertexRegistry
from retrain.ledger import event_hash
from retrain.localstack import Stack, emulators
from retrain.statedb import Database
from serving.vertex_endpoint import DeployError, VertexEndpoint
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
def database(stack: Stack, db: Database) -> Iterator[Database]:
    """A database of its own on the session's Firestore emulator (``db``'s project), named
    by a uuid, so that no test sees another's documents; emptied afterwards."""
    client = emulators.firestore_client(
        stack.firestore_host, db.client.project, f"db-{uuid.uuid4().hex}"
    )
    yield Database(client)
    client.recursive_delete(client.collection("registry"))
    client.close()


@pytest.fixture
def registry(fake: FakeModelService, database: Database) -> VertexRegistry:
    return VertexRegistry(make_settings(), database)


def record(run_id: str, roc_auc: float = 0.81234) -> dict[str, Any]:
    """A version record as the gatekeeper makes it (``Gatekeeper._version_record``), its
    artifact copied into the registry bucket (``keep_artifact``; registration reads none)."""
    return {
        "model": MODEL,
        "artifact_uri": f"gs://retrain-artifacts-registry/{MODEL}/{run_id}/model",
        "metrics": {"roc_auc": roc_auc, "accuracy": 0.9, "log_loss": 0.35, "rows": 2000.0},
        "run_id": run_id,
        "request_id": f"retrain-data/churn/{run_id}.csv#1767225600000000",
        "reason": "data",
        "lineage": {"train_data_uris": [], "train_rows": {}, "eval_data_uris": []},
    }


def stored(database: Database, *path: str) -> dict[str, Any] | None:
    """The Firestore document ``registry/<model>/<path...>`` as kept, or None."""
    return database.read_path("registry", MODEL, *path).data


def of(calls: list[Call], verb: str) -> list[Call]:
    return [c for c in calls if c.verb == verb]


def index(calls: list[Call], predicate: Any) -> int:
    return next(i for i, c in enumerate(calls) if predicate(c))


def promoted(registry: VertexRegistry, run_id: str, expected_generation: int) -> str:
    """Register ``run_id``'s version and promote it from the pointer's generation."""
    version = registry.register(MODEL, record(run_id))
    assert registry.promote(MODEL, version, expected_generation, by="test", reason=run_id)
    return version


# -- register --------------------------------------------------------------------------------


def test_register_uploads_one_version_per_run(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    assert registry.register(MODEL, record(RUN_A)) == "1"
    assert registry.register(MODEL, record(RUN_B, 0.83)) == "2"

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

    # The Firestore record keeps the join; Firestore still answers champion/version reads.
    version = stored(database, "versions", "000002")
    assert version is not None
    assert (version["vertex_model"], version["vertex_version_id"]) == (RESOURCE, "2")
    assert (version["run_id"], version["version"], version["number"]) == (RUN_B, "2", 2)
    assert (stored(database, "runs", RUN_B) or {})["version"] == "2"
    assert (stored(database) or {})["versions"] == 2
    assert fake.version(MODEL, "2")["labels"]["retrain_version"] == "2"
    found = registry.version(MODEL, "2")
    assert found is not None
    assert (found.run_id, found.artifact_uri) == (RUN_B, record(RUN_B)["artifact_uri"])
    assert registry.champion(MODEL) is None  # registering promotes nothing


def test_redelivered_register_calls_vertex_not_at_all(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    registry.register(MODEL, record(RUN_A))
    before = len(fake.calls)

    assert registry.register(MODEL, record(RUN_A)) == "1"
    assert fake.calls[before:] == []
    assert [r["run_id"] for r in registry.records(MODEL)] == [RUN_A]


def test_register_after_a_crash_finds_the_upload_by_its_run_label(
    registry: VertexRegistry,
    fake: FakeModelService,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("the function died after the upload")

    with monkeypatch.context() as patch:
        patch.setattr(VertexRegistry, "_join", crash)
        with pytest.raises(RuntimeError, match="died"):
            registry.register(MODEL, record(RUN_A))
    assert len(of(fake.calls, "upload")) == 1
    assert "vertex_version_id" not in (stored(database, "versions", "000001") or {})
    before = len(fake.calls)

    assert registry.register(MODEL, record(RUN_A)) == "1"
    again = fake.calls[before:]
    assert of(again, "upload") == []
    (lookup,) = of(again, "listVersions")
    assert lookup.query["filter"] == f'labels.retrain_run="{RUN_A}"'
    assert (stored(database, "versions", "000001") or {})["vertex_version_id"] == "1"


def test_concurrent_deliveries_keep_one_vertex_version(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    registry.register(MODEL, record(RUN_A))
    with fake.uploads_meet(2), ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: registry.register(MODEL, record(RUN_B)), range(2)))

    # Firestore's commit gives the run one number, whichever delivery made it; both
    # deliveries then found no Vertex version joined to it and uploaded one ...
    assert results == ["2", "2"]
    assert stored(database, "versions", "000003") is None
    assert len(of(fake.calls, "upload")) == 3
    # ... and the one that lost the join removed its own upload.
    (deleted,) = of(fake.calls, "deleteVersion")
    joined = (stored(database, "versions", "000002") or {})["vertex_version_id"]
    (loser,) = {"2", "3"} - {joined}
    assert deleted.path == f"/v1/{RESOURCE}@{loser}:deleteVersion"
    survivors = [v for v in fake.models[MODEL].values() if v["labels"]["retrain_run"] == RUN_B]
    assert [v["versionId"] for v in survivors] == [joined]


def test_two_first_registrations_race_for_the_model_id(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    with fake.uploads_meet(2), ThreadPoolExecutor(2) as pool:
        results = sorted(
            pool.map(lambda run: registry.register(MODEL, record(run)), (RUN_A, RUN_B))
        )

    assert results == ["1", "2"]
    uploads = of(fake.calls, "upload")
    assert [u.body.get("modelId") for u in uploads[:2]] == [MODEL, MODEL]
    assert uploads[2].body["parentModel"] == RESOURCE  # the loser of the id retried
    for version in ("1", "2"):
        found = stored(database, "versions", f"{int(version):06d}")
        assert found is not None
        labels = fake.version(MODEL, found["vertex_version_id"])["labels"]
        assert (labels["retrain_run"], labels["retrain_version"]) == (found["run_id"], version)


# -- promote and rollback ----------------------------------------------------------------------


def test_promote_moves_champion_and_default_to_the_new_version(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    promoted(registry, RUN_A, 0)
    registry.register(MODEL, record(RUN_B))
    before = len(fake.calls)

    assert registry.promote(MODEL, "2", 1, by="gatekeeper", reason=f"run {RUN_B}")

    calls = fake.calls[before:]
    # Vertex's alias was read before anything moved, and moved once Firestore had swapped.
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
    assert (champion.version, champion.generation) == ("2", 2)
    pointer = registry.champion_record(MODEL)
    assert pointer is not None
    assert (pointer["champion"], pointer["generation"], pointer["history"]) == ("2", 2, ["1"])
    assert (pointer["by"], pointer["reason"]) == ("gatekeeper", f"run {RUN_B}")
    audit = registry.audit(MODEL)
    assert [(a["from"], a["to"], a["generation"]) for a in audit] == [(None, "1", 1), ("1", "2", 2)]
    # The completed alias move is kept: what tells "Vertex lags" from "moved by hand".
    sync = stored(database, "vertex", "sync")
    assert sync is not None
    assert (sync["version"], sync["vertex_version_id"]) == ("2", "2")


def test_a_stale_promote_moves_no_alias(registry: VertexRegistry, fake: FakeModelService) -> None:
    promoted(registry, RUN_A, 0)
    registry.register(MODEL, record(RUN_B))
    before = len(fake.calls)

    assert not registry.promote(MODEL, "2", 0, by="gatekeeper", reason="compared with none")
    assert fake.mutations(before) == []
    assert fake.alias_holder(MODEL, "champion") == "1"
    champion = registry.champion(MODEL)
    assert champion is not None
    assert (champion.version, champion.generation) == ("1", 1)

    # Staleness is by generation, not by version: after v2 and a rollback to v1, v1 is the
    # champion again, but a move decided at generation 1 (when v1 was too) is stale.
    assert registry.promote(MODEL, "2", 1, by="operator", reason="try v2")
    assert registry.rollback(MODEL, 2, by="operator", reason="back to v1") == "1"
    registry.register(MODEL, record(RUN_C))
    before = len(fake.calls)
    assert not registry.promote(MODEL, "3", 1, by="gatekeeper", reason=f"run {RUN_C}")
    assert registry.rollback(MODEL, 1, by="operator", reason="late") is None
    assert fake.mutations(before) == []
    assert registry.pointer(MODEL) == Pointer("1", 3)
    assert fake.alias_holder(MODEL, "champion") == "1"


def test_an_alias_moved_by_hand_makes_promote_stale_until_adopted(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    aiplatform = importlib.import_module("google.cloud.aiplatform")
    promoted(registry, RUN_A, 0)
    registry.register(MODEL, record(RUN_B))
    registry.register(MODEL, record(RUN_C))
    # Someone moves the champion to v2 in the console.
    aiplatform.models.ModelRegistry(RESOURCE).add_version_aliases(["champion"], "2")
    pointer = registry.champion_record(MODEL)
    before = len(fake.calls)

    # The gatekeeper asks before its commit (against the Firestore champion, v1) ...
    veto = registry.veto(MODEL, "1", "3")
    assert veto is not None
    assert veto.startswith(f"stale: Vertex AI's champion alias of {RESOURCE} is on version 2,")
    assert "not v1's" in veto
    # ... and so does an operator's promote or rollback: refused with the reason, nothing
    # moves.
    with pytest.raises(RegistryError, match="moved by hand"):
        registry.promote(MODEL, "3", 1, by="operator", reason="try v3")
    assert fake.mutations(before) == []
    assert registry.champion_record(MODEL) == pointer  # Firestore did not move either
    assert not registry.sync_champion(MODEL)  # nor does a redelivery overwrite the console
    assert fake.mutations(before) == []
    assert fake.alias_holder(MODEL, "champion") == "2"

    # An operator adopts what the console says: Firestore follows, the aliases stay together.
    assert registry.veto(MODEL, "1", "2") is None
    assert registry.promote(MODEL, "2", 1, by="operator", reason="as set in the console")
    assert (fake.alias_holder(MODEL, "champion"), fake.alias_holder(MODEL, "default")) == (
        "2",
        "2",
    )
    assert registry.pointer(MODEL) == Pointer("2", 2)
    assert registry.veto(MODEL, "2", "3") is None  # and the next promotion may go ahead


def test_a_rollback_does_not_overwrite_an_alias_moved_by_hand(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    aiplatform = importlib.import_module("google.cloud.aiplatform")
    promoted(registry, RUN_A, 0)
    promoted(registry, RUN_B, 1)
    registry.register(MODEL, record(RUN_C))
    aiplatform.models.ModelRegistry(RESOURCE).add_version_aliases(["champion"], "3")
    before = len(fake.calls)
    with pytest.raises(RegistryError, match="moved by hand"):
        registry.rollback(MODEL, 2, by="operator", reason="back to v1")
    assert fake.mutations(before) == []
    assert registry.pointer(MODEL) == Pointer("2", 2)
    assert fake.alias_holder(MODEL, "champion") == "3"


def test_a_promotion_that_died_before_the_alias_move_is_finished(
    registry: VertexRegistry, fake: FakeModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    promoted(registry, RUN_A, 0)
    registry.register(MODEL, record(RUN_B))

    def crash(self: VertexRegistry, model: str) -> None:
        raise RuntimeError("the function died after the Firestore commit")

    with monkeypatch.context() as patch:
        patch.setattr(VertexRegistry, "project", crash)
        with pytest.raises(RuntimeError, match="died"):
            registry.promote(MODEL, "2", 1, by="gatekeeper", reason=f"run {RUN_B}")
    assert registry.pointer(MODEL) == Pointer("2", 2)
    assert fake.alias_holder(MODEL, "champion") == "1"  # Vertex lags behind Firestore

    # The redelivered decision, which deploys the champion, finishes it ...
    vertex_endpoint(registry).deploy(MODEL, "2")
    assert fake.alias_holder(MODEL, "champion") == "2"
    assert serving(fake) == {"2": 100}
    assert registry.sync_champion(MODEL)
    # ... and a lagging alias blocks no later move either: the alias (on v2) is where our
    # last completed move left it, not on the Firestore champion (v3), not moved by hand.
    with monkeypatch.context() as patch:
        patch.setattr(VertexRegistry, "project", crash)
        with pytest.raises(RuntimeError, match="died"):
            promoted(registry, RUN_C, 2)
    assert fake.alias_holder(MODEL, "champion") == "2"
    assert registry.veto(MODEL, "3", "1") is None
    assert registry.promote(MODEL, "1", 3, by="operator", reason="v3 is bad, v1 again")
    assert fake.alias_holder(MODEL, "champion") == "1"
    assert fake.alias_holder(MODEL, "default") == "1"


def test_an_alias_on_the_firestore_champion_is_not_a_hand_move(
    registry: VertexRegistry,
    fake: FakeModelService,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aiplatform = importlib.import_module("google.cloud.aiplatform")

    def crash(self: VertexRegistry, model: str) -> None:
        raise RuntimeError("the function died after the Firestore commit")

    # v1 is the champion in Firestore, but no alias move ever completed (none is kept).
    with monkeypatch.context() as patch:
        patch.setattr(VertexRegistry, "project", crash)
        with pytest.raises(RuntimeError, match="died"):
            promoted(registry, RUN_A, 0)
    assert stored(database, "vertex", "sync") is None
    registry.register(MODEL, record(RUN_B))
    registry.register(MODEL, record(RUN_C))
    models = aiplatform.models.ModelRegistry(RESOURCE)

    # An alias put on v2 by hand is neither the Firestore champion nor our last move ...
    models.add_version_aliases(["champion"], "2")
    assert registry.veto(MODEL, "1", "3") is not None
    # ... but one put on v1 agrees with the Firestore champion: the promotion goes ahead.
    models.add_version_aliases(["champion"], "1")
    assert registry.veto(MODEL, "1", "3") is None
    assert registry.promote(MODEL, "3", 1, by="gatekeeper", reason=f"run {RUN_C}")
    assert (fake.alias_holder(MODEL, "champion"), fake.alias_holder(MODEL, "default")) == (
        "3",
        "3",
    )


def test_rollback_walks_the_history_back_and_moves_the_aliases(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    for generation, run in enumerate((RUN_A, RUN_B, RUN_C)):
        promoted(registry, run, generation)
    pointer = registry.champion_record(MODEL)
    assert pointer is not None
    assert pointer["history"] == ["2", "1"]

    # One step back, then another: each moves both aliases, after the commit.
    for generation, version, history in ((3, "2", ["1"]), (4, "1", [])):
        before = len(fake.calls)
        assert registry.rollback(MODEL, generation, by="operator", reason="bad") == version
        (merge,) = of(fake.calls[before:], "mergeVersionAliases")
        assert merge.path.endswith(f"/models/{MODEL}@{version}:mergeVersionAliases")
        assert (fake.alias_holder(MODEL, "champion"), fake.alias_holder(MODEL, "default")) == (
            version,
            version,
        )
        assert (registry.champion_record(MODEL) or {})["history"] == history
        assert registry.pointer(MODEL) == Pointer(version, generation + 1)

    # Nothing left to go back to, and a stale rollback: both leave Vertex alone.
    before = len(fake.calls)
    with pytest.raises(RegistryError, match="not an earlier champion"):
        registry.rollback(MODEL, 5, by="operator", reason="further")
    with pytest.raises(RegistryError, match=r"v3 is not an earlier champion"):
        registry.rollback(MODEL, 5, by="operator", reason="forward", to="3")
    assert registry.rollback(MODEL, 4, by="operator", reason="stale") is None
    assert fake.mutations(before) == []
    assert [(a["action"], a["to"]) for a in registry.audit(MODEL)] == [
        ("promote", "1"), ("promote", "2"), ("promote", "3"), ("rollback", "2"), ("rollback", "1"),
    ]  # fmt: skip


def test_promote_of_an_unknown_version_is_an_error(
    registry: VertexRegistry, fake: FakeModelService
) -> None:
    with pytest.raises(RegistryError, match="churn has no version 7"):
        registry.promote(MODEL, "7", 0, by="operator", reason="typo")
    assert fake.calls == []
    assert registry.champion_record(MODEL) is None


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


def deploy_record(database: Database) -> dict[str, Any] | None:
    """``registry/<model>/vertex/deploy``: the endpoint change under way, if any, as
    Firestore keeps it (with its ``generation``)."""
    return stored(database, "vertex", "deploy")


def content(found: dict[str, Any] | None) -> dict[str, Any]:
    """A deploy record without its ``generation``, as the registry hands it out."""
    assert found is not None
    return {k: v for k, v in found.items() if k != "generation"}


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
    promoted(registry, RUN_A, 0)
    endpoint.deploy(MODEL, "1")

    (created,) = [c for c in fake.mutations() if c.path == f"/v1/{PARENT}/endpoints"]
    assert created.body == {
        "displayName": f"retrain-{MODEL}",
        "labels": {"team": "ml", "retrain_model": MODEL},
        # serving.log_sample_rate (default 1), to the table Vertex AI makes (no
        # gcp.endpoint.request_response_logging_table): tests/contract/test_vertex_canary.py
        "predictRequestResponseLoggingConfig": {
            "enabled": True, "samplingRate": 1, "bigqueryDestination": {},
        },
    }  # fmt: skip
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

    promoted(registry, RUN_B, 1)
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
    promoted(registry, RUN_A, 0)
    endpoint.deploy(MODEL, "1")  # nothing serves yet: the first version takes everything
    assert serving(fake) == {"1": 100}
    first = deployed_id(fake, "1")

    promoted(registry, RUN_B, 1)
    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")
    (deploy,) = of(fake.mutations(before), "deployModel")
    assert deploy.body["trafficSplit"] == {"0": 10, first: 90}
    assert of(fake.mutations(before), "undeployModel") == []
    assert serving(fake) == {"1": 90, "2": 10}

    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")  # a redelivered decision
    assert fake.mutations(before) == []

    # Rollback = the previous champion again, then deploy it: it still serves, so only the
    # traffic moves (no second deployment), then the bad version goes.
    assert registry.rollback(MODEL, 2, by="operator", reason="v2 misbehaves") == "1"
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
    for generation, run in enumerate((RUN_A, RUN_B, RUN_C)):
        endpoint.deploy(MODEL, promoted(registry, run, generation))
    assert serving(fake) == {"2": 90, "3": 10}  # v1 went when v3 arrived

    assert registry.rollback(MODEL, 3, by="operator", reason="to v1", to="1") == "1"
    assert fake.alias_holder(MODEL, "champion") == "1"
    before = len(fake.calls)
    endpoint.deploy(MODEL, "1")
    calls = fake.mutations(before)
    assert [c.verb for c in calls] == ["deployModel", "undeployModel", "undeployModel"]
    assert calls[0].body["trafficSplit"] == {"0": 100}  # a rollback is never a canary
    assert serving(fake) == {"1": 100}


def test_a_deployment_that_outlasts_the_wait_is_finished_by_the_next_call(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, 0)
    endpoint.deploy(MODEL, "1")
    old = deployed_id(fake, "1")
    promoted(registry, RUN_B, 1)
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
    assert operation.polls >= 1  # waited for it, a bounded while (one poll on a busy machine)
    kept = deploy_record(database)
    assert kept is not None
    assert kept["started_at"]
    assert kept["generation"] == 2  # written twice: claimed, then its operation kept
    assert registry.deploy_record(MODEL) == (content(kept), 2)
    assert {k: v for k, v in content(kept).items() if k != "started_at"} == {
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
    assert deploy_record(database) == kept

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
    assert deploy_record(database) is None

    before = len(fake.calls)
    endpoint.deploy(MODEL, "2")  # and then a repeat is a no-op again
    assert fake.mutations(before) == []


def test_another_version_is_refused_while_a_deployment_is_in_flight(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, 0)
    endpoint.deploy(MODEL, "1")
    first = deployed_id(fake, "1")
    promoted(registry, RUN_B, 1)
    fake.hold("deployModel")
    endpoint.deploy(MODEL, "2")
    in_flight = deploy_record(database)
    assert in_flight is not None
    assert in_flight["phase"] == "deploying"

    # The next promotion, and a rollback to v1 (which would only move traffic): both fail,
    # naming the version in flight, and change nothing; Pub/Sub (or the operator) retries.
    promoted(registry, RUN_C, 2)
    before = len(fake.calls)
    for version in ("3", "1"):
        with pytest.raises(DeployError, match=r"v2 \(Vertex version 2\) is still being deployed"):
            endpoint.deploy(MODEL, version)
    assert fake.mutations(before) == []
    assert deploy_record(database) == in_flight

    # Once v2 serves, the retried v3 first finishes v2's change (v1 goes), then deploys.
    fake.release("deployModel")
    before = len(fake.calls)
    endpoint.deploy(MODEL, "3")
    calls = fake.mutations(before)
    assert [c.verb for c in calls] == ["undeployModel", "deployModel", "undeployModel"]
    assert calls[0].body["deployedModelId"] == first
    assert calls[1].body["deployedModel"]["model"] == f"{RESOURCE}@3"
    assert serving(fake) == {"3": 100}
    assert deploy_record(database) is None


def test_a_failed_deployment_raises_and_clears_its_record(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, 0)
    endpoint.deploy(MODEL, "1")
    promoted(registry, RUN_B, 1)
    fake.fail("deployModel", "the container did not become healthy")
    before = len(fake.calls)

    with pytest.raises(DeployError, match=r"v2 .*failed.*did not become healthy \(code 9\)"):
        endpoint.deploy(MODEL, "2")
    assert deploy_record(database) is None
    assert of(fake.mutations(before), "undeployModel") == []
    assert serving(fake) == {"1": 100}  # the old version goes on serving

    # A failure that happens after the call returned is raised by the next call.
    fake.hold("deployModel")
    endpoint.deploy(MODEL, "2")
    assert deploy_record(database) is not None
    fake.release("deployModel")
    with pytest.raises(DeployError, match="did not become healthy"):
        endpoint.deploy(MODEL, "2")
    assert deploy_record(database) is None

    # The retry (Pub/Sub redelivers) deploys it afresh.
    fake.fail("deployModel", None)
    endpoint.deploy(MODEL, "2")
    assert len(of(fake.mutations(before), "deployModel")) == 3
    assert serving(fake) == {"2": 100}
    assert deploy_record(database) is None


def test_an_undeploy_in_flight_is_not_sent_twice(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, 0)
    endpoint.deploy(MODEL, "1")
    old = deployed_id(fake, "1")
    promoted(registry, RUN_B, 1)
    fake.hold("undeployModel")

    endpoint.deploy(MODEL, "2")  # v2 serves; undeploying v1 goes on
    (undeploy,) = fake.operations_of("undeployModel")
    kept = deploy_record(database)
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
    assert deploy_record(database) is None


def test_a_deployment_being_started_elsewhere_is_left_to_that_call(
    registry: VertexRegistry, fake: FakeModelService, database: Database
) -> None:
    endpoint = vertex_endpoint(registry)
    promoted(registry, RUN_A, 0)
    claim = {"version": "1", "vertex_version_id": "1", "phase": "starting", "operation": None,
             "started_at": datetime.now(UTC).isoformat()}  # fmt: skip
    assert registry.deploy_uri(MODEL) == f"registry/{MODEL}/vertex/deploy"
    assert registry.write_deploy_record(MODEL, claim, 0) == 1
    assert registry.write_deploy_record(MODEL, claim, 0) is None  # create-only at 0
    before = len(fake.calls)

    with pytest.raises(
        DeployError,
        match=f"another call is starting the deployment of v1 .*registry/{MODEL}/vertex/deploy",
    ):
        endpoint.deploy(MODEL, "1")
    assert of(fake.mutations(before), "deployModel") == []
    assert deploy_record(database) == {**claim, "generation": 1}

    # A claim that never got its operation within minutes belongs to a call that died.
    found = registry.deploy_record(MODEL)
    assert found is not None
    stale = {**claim, "started_at": (datetime.now(UTC) - timedelta(minutes=10)).isoformat()}
    assert found == (claim, 1)
    assert registry.write_deploy_record(MODEL, stale, found[1]) == 2
    assert not registry.clear_deploy_record(MODEL, 1)  # only the generation it read
    assert deploy_record(database) == {**stale, "generation": 2}
    endpoint.deploy(MODEL, "1")
    assert len(of(fake.mutations(before), "deployModel")) == 1
    assert serving(fake) == {"1": 100}
    assert deploy_record(database) is None
