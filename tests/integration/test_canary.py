"""The self-deciding canary on the Firestore emulator: the gate starts it, the live numbers
complete it or roll it back, an operator's move ends it, and runs evaluated against a
rolled-back canary are found stale. The Serving port is a recording adapter (what it is
asked to serve, at which share); Pub/Sub is a recording bus (what was published)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from retrain.config import Canary, Settings
from retrain.gatekeeper.registry import CanaryState, FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.messages import Decision, Message
from retrain.service import RetrainService
from retrain.statedb import Database
from tests.conftest import unique
from tests.integration.test_serving_port import NoLauncher, RecordingServing, launched, report

pytestmark = pytest.mark.integration

SPEC = Canary(percent=10, min_labelled=300, max_regression=0.02)


class RecordingBus:
    """The Bus port: keeps what is published; ``fail`` publishes fail (Pub/Sub is down)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Message, dict[str, str]]] = []
        self.fail = 0

    def publish(self, topic: str, message: Message, **attributes: str) -> str:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("503 Pub/Sub is unavailable")
        self.published.append((topic, message, attributes))
        return f"msg-{len(self.published)}"

    def decisions(self, stage: str) -> list[Decision]:
        return [m for _, m, _ in self.published if isinstance(m, Decision) and m.stage == stage]


class RecordingLauncher(NoLauncher):
    """Records the runs submitted (a stale report's events run again, against v1)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, model: str, run_id: str) -> None:
        self.submitted.append(run_id)


@pytest.fixture
def model(settings: Settings, db: Database, gcs: Any) -> Iterator[str]:
    name = unique("canary")
    yield name
    for collection in ("ledger", "registry"):
        db.client.recursive_delete(db.doc(collection, name))
    for blob in gcs.list_blobs(settings.buckets.artifacts, prefix=f"runs/{name}/"):
        blob.delete()
    for blob in gcs.list_blobs(settings.buckets.models, prefix=f"{name}/"):
        blob.delete()


class World:
    """One model with ``gate.canary``; its service, registry, bus and serving."""

    def __init__(self, settings: Settings, db: Database, gcs: Any, model: str) -> None:
        base = settings.models["rainfall"]
        spec = base.model_copy(
            update={"data_prefix": f"{model}/", "gate": base.gate.model_copy(
                update={"canary": SPEC})}
        )  # fmt: skip
        self.settings = settings.model_copy(update={"models": {model: spec}})
        self.model, self.gcs = model, gcs
        self.ledger = FirestoreLedger(db)
        self.registry = FirestoreRegistry(db, settings.buckets.models, gcs)
        self.bus = RecordingBus()
        self.serving = RecordingServing()
        self.launcher = RecordingLauncher()
        self.service = RetrainService(self.settings, self.ledger, self.launcher, self.bus,
                                      self.registry, self.serving)  # fmt: skip

    def run(self, run_id: str, roc_auc: float, champion: tuple[str, int] | None) -> Decision:
        candidate = launched(self.settings, self.ledger, self.gcs, self.model, run_id)
        outcome = self.service.report(report(self.model, run_id, candidate, roc_auc, champion))
        assert outcome.action == "decided", outcome.detail
        kept = self.registry.decision(self.model, run_id)
        assert kept is not None
        return Decision.model_validate(kept["decision"])

    def canary(self) -> Decision:
        """v1 serves in full; run-2's better candidate starts a canary."""
        assert self.run("run-1", 0.80, None).verdict == "promoted"
        return self.run("run-2", 0.85, ("1", 1))

    def settle(self, live: dict[str, dict[str, float]]) -> Decision | None:
        """A monitor tick: the gatekeeper settles; its Decision is served (on Vertex AI)."""
        decision = self.service.gatekeeper.settle_canary(self.model, live)
        if decision is not None:
            self.service._serve(decision)  # what the monitor's caller does on Vertex AI
        return decision

    def actions(self) -> list[tuple[str, str, str]]:
        return [(a["action"], a["to"], a["by"]) for a in self.registry.audit(self.model)]


def live(canary: float, previous: float, labelled: int = 400) -> dict[str, dict[str, float]]:
    return {
        "2": {"roc_auc": canary, "labelled": float(labelled), "served": 2.0 * labelled},
        "1": {"roc_auc": previous, "labelled": 3600.0, "served": 7200.0},
    }


@pytest.fixture
def world(settings: Settings, db: Database, gcs: Any, model: str) -> World:
    return World(settings, db, gcs, model)


def test_the_gate_starts_a_canary_in_one_move_of_the_pointer(world: World) -> None:
    gate = world.canary()

    assert gate.verdict == "canary"
    assert gate.stage == "gate"
    assert (gate.new_version, gate.previous_champion) == ("2", "1")
    assert gate.reasons[-1].startswith("canary: v2 serves 10% of the traffic until 300")
    state = world.registry.canary(world.model)
    assert state is not None
    assert (state.version, state.previous, state.percent, state.generation) == ("2", "1", 10, 2)
    head = world.registry.champion_record(world.model)
    assert head is not None
    assert (head["champion"], head["generation"], head["history"]) == ("2", 2, ["1"])
    assert world.actions() == [("promote", "1", "gatekeeper"), ("canary", "2", "gatekeeper")]
    assert world.registry.records(world.model)[1]["verdict"] == "canary"
    # The first version had no champion to share traffic with: a plain promotion, in full.
    assert world.serving.deployed == [(world.model, "1"), (world.model, "2")]
    assert world.serving.shares == [0, 10]
    assert [d.verdict for d in world.bus.decisions("gate")] == ["promoted", "canary"]


def test_a_canary_that_holds_up_completes(world: World) -> None:
    world.canary()

    assert world.settle(live(0.90, 0.80, labelled=299)) is None, "not enough labels yet"
    decision = world.settle(live(0.79, 0.80))

    assert decision is not None
    assert (decision.stage, decision.verdict, decision.run_id) == ("canary", "promoted", "run-2")
    assert decision.live == live(0.79, 0.80)
    assert decision.reasons[1] == (
        "live roc_auc v2 0.790 vs v1 0.800 on the same window: regression +0.0100 <= max "
        "0.0200: pass"
    )
    # The pointer stays (same generation: reports against v2 stay valid); the canary ends.
    head = world.registry.champion_record(world.model)
    assert head is not None
    assert (head["champion"], head["generation"], head.get("canary")) == ("2", 2, None)
    assert world.registry.canary(world.model) is None
    assert len(world.registry.audit(world.model)) == 2, "a completion moves no pointer"
    kept = world.registry.canary_decision(world.model, "run-2")
    assert kept is not None
    assert Decision.model_validate(kept["decision"]) == decision
    assert kept["message_id"] == "msg-3"
    assert world.bus.decisions("canary") == [decision]
    assert world.registry.records(world.model)[1]["canary_verdict"] == "promoted"
    assert world.serving.deployed[-1] == (world.model, "2")
    assert world.serving.shares[-1] == 0, "completed: all traffic"

    assert world.settle(live(0.79, 0.80)) is None, "settled once"
    assert len(world.bus.published) == 3
    # A run evaluated against v2 at the canary's generation is not stale.
    assert world.run("run-3", 0.90, ("2", 2)).verdict == "canary"


def test_a_worse_canary_rolls_back_and_runs_against_it_are_stale(world: World) -> None:
    world.canary()
    decision = world.settle(live(0.71, 0.80))

    assert decision is not None
    assert (decision.stage, decision.verdict) == ("canary", "rolled_back")
    assert "regression +0.0900 <= max 0.0200: FAIL" in decision.reasons[1]
    assert decision.reasons[-1] == "rolled back: v1 serves all traffic again, v2 none"
    head = world.registry.champion_record(world.model)
    assert head is not None
    assert (head["champion"], head["generation"], head["history"]) == ("1", 3, [])
    assert world.actions()[-1] == ("rollback", "1", "canary")
    assert world.registry.records(world.model)[1]["canary_verdict"] == "rolled_back"
    assert world.serving.deployed[-1] == (world.model, "1")
    assert world.serving.shares[-1] == 0
    assert world.bus.decisions("canary") == [decision]

    stale = world.run("run-3", 0.90, ("2", 2))
    assert stale.verdict == "rejected"
    assert any(r.startswith("stale: evaluated against v2 (pointer generation 2)")
               for r in stale.reasons)  # fmt: skip
    kept = world.registry.decision(world.model, "run-3")
    assert kept is not None
    assert kept["requeued"] is True, "its events wait for a run against v1"
    assert len(world.launcher.submitted) == 1, "the trailing run, against v1"


def test_an_operator_move_during_the_canary_wins(world: World) -> None:
    world.canary()
    assert world.registry.rollback(world.model, 2, "ops", "not now") == "1"

    assert world.registry.canary(world.model) is None
    assert world.settle(live(0.71, 0.80)) is None
    assert world.registry.canary_decision(world.model, "run-2") is None
    assert world.bus.decisions("canary") == []
    assert world.actions()[-1] == ("rollback", "1", "ops")


def test_promoting_the_canary_by_hand_completes_it(world: World) -> None:
    world.canary()
    assert world.registry.promote(world.model, "2", 2, "ops", "good enough")

    head = world.registry.champion_record(world.model)
    assert head is not None
    assert (head["champion"], head["generation"], head["by"]) == ("2", 2, "ops")
    assert world.registry.canary(world.model) is None
    assert len(world.registry.audit(world.model)) == 2
    assert world.settle(live(0.71, 0.80)) is None


def test_a_new_candidate_during_a_canary_keeps_the_proven_version_beside_it(
    world: World,
) -> None:
    world.canary()
    assert world.run("run-3", 0.90, ("2", 2)).verdict == "canary"

    state = world.registry.canary(world.model)
    assert state is not None
    assert state == CanaryState("3", "1", 10, state.started_at, 3)
    head = world.registry.champion_record(world.model)
    assert head is not None
    assert head["history"] == ["2", "1"]
    rolled = world.service.gatekeeper.settle_canary(
        world.model, {"3": {"roc_auc": 0.5, "labelled": 500.0},
                      "1": {"roc_auc": 0.8, "labelled": 900.0}},
    )  # fmt: skip
    assert rolled is not None
    assert rolled.verdict == "rolled_back"
    head = world.registry.champion_record(world.model)
    assert head is not None
    assert (head["champion"], head["history"]) == ("1", [])


def test_a_publish_that_failed_is_finished_by_the_next_call(world: World) -> None:
    world.canary()
    world.bus.fail = 1
    with pytest.raises(RuntimeError, match="Pub/Sub is unavailable"):
        world.settle(live(0.79, 0.80))
    kept = world.registry.canary_decision(world.model, "run-2")
    assert kept is not None
    assert kept["message_id"] is None
    assert world.registry.unpublished_canaries(world.model) == ["run-2"]

    finished = world.settle({})  # the next tick: no canary any more, numbers or not
    assert finished is not None
    assert finished == Decision.model_validate(kept["decision"])
    assert world.bus.decisions("canary") == [finished]
    assert world.registry.unpublished_canaries(world.model) == []
    assert world.settle(live(0.79, 0.80)) is None
    assert len(world.bus.decisions("canary")) == 1
