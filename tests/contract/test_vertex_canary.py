"""Contract: the canary's steps on a Vertex AI endpoint, through the real SDK against the
recording fake and the real Firestore emulator.

The gate starts a canary (the pointer moves to v2 and records it); the service's serving
hook deploys v2 at ``gate.canary.percent`` beside v1; the gatekeeper settles the canary on
live numbers and the hook either completes it (v2 takes all traffic, v1 is undeployed
after) or rolls it back (v1 takes all traffic again, v2 is undeployed after), the
``champion`` alias following the pointer. Also: the endpoint is created with Vertex AI's
request-response logging, as ``serving.log_sample_rate`` and ``gcp.endpoint`` say.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from retrain.config import Settings
from retrain.gatekeeper.vertex import VertexRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.messages import Decision, Message
from retrain.service import RetrainService
from retrain.statedb import Change, Database
from serving.vertex_endpoint import VertexEndpoint
from tests.contract.fake_model_service import FakeModelService
from tests.contract.sdk_config import use_fake
from tests.contract.test_vertex_registry import (
    MODEL,
    PARENT,
    POLL,
    RUN_A,
    RUN_B,
    WAIT,
    deployed_id,
    of,
    record,
    serving,
)
from tests.integration.test_serving_port import NoLauncher

pytestmark = pytest.mark.contract

PROJECT, REGION = "retrain-test", "us-central1"
TABLE = "bq://retrain-test.serving_logs.churn"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeModelService]:
    """The fake, the SDK pointed at it (as in test_vertex_registry.py)."""
    with FakeModelService(PROJECT, REGION) as service:
        use_fake(monkeypatch, service.url, PROJECT, REGION)
        yield service
        assert service.unrouted == [], "calls that the fake has no route for"


@pytest.fixture
def database(stack: Stack, db: Database) -> Iterator[Database]:
    """A database of its own on the session's Firestore emulator, emptied afterwards."""
    client = emulators.firestore_client(
        stack.firestore_host, db.client.project, f"db-{uuid.uuid4().hex}"
    )
    yield Database(client)
    client.recursive_delete(client.collection("registry"))
    client.close()


def make_settings(canary_percent: int = 25, table: str | None = TABLE, **model: Any) -> Settings:
    """The churn model with ``gate.canary`` (10 %), on an endpoint whose static
    ``canary_percent`` (25) the canary overrides."""
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
                    "canary_percent": canary_percent,
                    "request_response_logging_table": table,
                },
            },
            "models": {
                MODEL: {
                    "data_prefix": "churn/",
                    "label": "y",
                    "order_column": "t",
                    "gate": {"canary": {"percent": 10, "min_labelled": 100}},
                    **model,
                }
            },
        }
    )


class Bus:
    def __init__(self) -> None:
        self.published: list[Message] = []

    def publish(self, topic: str, message: Message, **attributes: str) -> str:
        del topic, attributes
        self.published.append(message)
        return f"m{len(self.published)}"


class Canary:
    """The service of one model with a canary, on Vertex AI (the fake) and Firestore."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.registry = VertexRegistry(settings, database)
        self.endpoint = VertexEndpoint(settings, self.registry, wait_seconds=WAIT,
                                       poll_seconds=POLL)  # fmt: skip
        self.service = RetrainService(settings, FirestoreLedger(database), NoLauncher(), Bus(),
                                      self.registry, self.endpoint)  # fmt: skip
        self.db = database

    def start(self) -> None:
        """v1 serves in full; run B's v2 passes the gate: the gate's commit starts its
        canary, and the decision is served."""
        first = self.registry.register(MODEL, record(RUN_A, 0.80))
        assert self.registry.promote(MODEL, first, 0, "gatekeeper", "first")
        self.service._serve(Decision(model=MODEL, run_id=RUN_A, verdict="promoted",
                                     reasons=["first"], new_version="1"))  # fmt: skip
        second = self.registry.register(MODEL, record(RUN_B, 0.85))
        gate = Decision(model=MODEL, run_id=RUN_B, verdict="canary", reasons=["better"],
                        new_version=second, previous_champion=first)  # fmt: skip
        kept = {"decision": gate.model_dump(mode="json"), "time": gate.time.isoformat(),
                "message_id": "g", "requeued": False}  # fmt: skip
        change = Change()
        self.registry.decide(change, MODEL, self.registry.run_doc(MODEL, RUN_B),
                             self.registry.head_doc(MODEL), kept, second, True, "gatekeeper",
                             f"run {RUN_B}", canary=10)  # fmt: skip
        self.db.commit(change)
        self.registry.project(MODEL)
        self.service._serve(gate)

    def settle(self, canary: float) -> Decision:
        live = {"2": {"roc_auc": canary, "labelled": 150.0, "served": 400.0},
                "1": {"roc_auc": 0.80, "labelled": 1500.0, "served": 4000.0}}  # fmt: skip
        decision = self.service.gatekeeper.settle_canary(MODEL, live)
        assert decision is not None
        self.service._serve(decision)
        return decision


def test_the_canary_deploys_at_its_share_and_completes(
    fake: FakeModelService, database: Database
) -> None:
    world = Canary(make_settings(), database)
    world.start()

    first = deployed_id(fake, "1")
    (full, deploy) = of(fake.calls, "deployModel")
    assert full.body["trafficSplit"] == {"0": 100}, "a first version takes all traffic"
    assert deploy.body["trafficSplit"] == {"0": 10, first: 90}, "gate.canary.percent, not 25"
    assert deploy.body["deployedModel"]["model"].endswith(f"/models/{MODEL}@2")
    assert of(fake.calls, "undeployModel") == []
    assert serving(fake) == {"1": 90, "2": 10}
    assert fake.alias_holder(MODEL, "champion") == "2", "the alias follows the pointer"

    before = len(fake.calls)
    world.service._serve(Decision(model=MODEL, run_id=RUN_B, verdict="canary",
                                  reasons=["again"], new_version="2"))  # fmt: skip
    assert fake.mutations(before) == [], "a redelivered gate decision changes nothing"

    before = len(fake.calls)
    decision = world.settle(0.81)
    assert (decision.stage, decision.verdict) == ("canary", "promoted")
    calls = [c for c in fake.mutations(before) if "/endpoints/" in c.path]
    assert [(c.method, c.verb) for c in calls] == [("PATCH", ""), ("POST", "undeployModel")]
    assert calls[0].body["trafficSplit"] == {deployed_id(fake, "2"): 100}
    assert calls[1].body["deployedModelId"] == first, "v1 goes only after v2 serves in full"
    assert serving(fake) == {"2": 100}
    assert fake.alias_holder(MODEL, "champion") == "2"


def test_a_worse_canary_is_rolled_back_on_the_endpoint(
    fake: FakeModelService, database: Database
) -> None:
    world = Canary(make_settings(), database)
    world.start()
    first, canary = deployed_id(fake, "1"), deployed_id(fake, "2")

    before = len(fake.calls)
    decision = world.settle(0.70)
    assert (decision.stage, decision.verdict) == ("canary", "rolled_back")
    calls = [c for c in fake.mutations(before) if "/endpoints/" in c.path]
    assert [(c.method, c.verb) for c in calls] == [("PATCH", ""), ("POST", "undeployModel")]
    patch, undeploy = calls
    assert patch.body["trafficSplit"] == {first: 100}, "v1 still served: only traffic moves"
    assert undeploy.body["deployedModelId"] == canary
    assert serving(fake) == {"1": 100}
    assert deployed_id(fake, "1") == first, "v1 was never redeployed"
    assert fake.alias_holder(MODEL, "champion") == "1", "the alias follows the rollback"


def test_the_endpoint_logs_requests_and_responses_as_configured(
    fake: FakeModelService, database: Database
) -> None:
    settings = make_settings(serving={"log_sample_rate": 0.25})
    VertexEndpoint(settings, VertexRegistry(settings, database)).endpoint(MODEL)

    (created,) = [c for c in fake.mutations() if c.path == f"/v1/{PARENT}/endpoints"]
    assert created.body["predictRequestResponseLoggingConfig"] == {
        "enabled": True,
        "samplingRate": 0.25,
        "bigqueryDestination": {"outputUri": TABLE},
    }
    assert fake.endpoint_state(f"retrain-{MODEL}")["predictRequestResponseLoggingConfig"][
        "samplingRate"
    ] == pytest.approx(0.25)


def test_no_logging_table_takes_vertex_default_and_a_zero_rate_turns_logging_off(
    fake: FakeModelService, database: Database
) -> None:
    settings = make_settings(table=None)
    VertexEndpoint(settings, VertexRegistry(settings, database)).endpoint(MODEL)
    (created,) = [c for c in fake.mutations() if c.path == f"/v1/{PARENT}/endpoints"]
    config = created.body["predictRequestResponseLoggingConfig"]
    assert (config["enabled"], config["samplingRate"]) == (True, 1)
    assert not (config.get("bigqueryDestination") or {}).get("outputUri")

    quiet = make_settings(serving={"log_sample_rate": 0})
    found = VertexEndpoint(quiet, VertexRegistry(quiet, database))
    fake.endpoints.clear()
    before = len(fake.calls)
    found.endpoint(MODEL)
    (created,) = [c for c in fake.mutations(before) if c.path == f"/v1/{PARENT}/endpoints"]
    assert "predictRequestResponseLoggingConfig" not in created.body
