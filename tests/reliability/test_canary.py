"""The canary's protocol under crashes and races (docs/reliability.md, "The canary").

Invariants, at quiescence (nothing waits, no canary decision unpublished):

- (k1) at most one canary Decision per canary: one kept in its run's document, and every
  canary Decision published for the model is that one (a redelivery may publish it
  again, never a second, different one);
- (k2) every kept canary Decision is published: its message id is kept and the pointer's
  ``canary_unpublished`` is empty;
- (k3) the pointer is at the canary's version iff the canary completed (and no operator
  moved it since) or is still pending; after a rollback by the canary it is at the
  previous champion; a canary Decision is only made on the canary the pointer records;
- (k4) the audit trail is the pointer's history: one entry per move (generation = number
  of entries, the last names the champion); a completion moves nothing, a rollback by
  the canary is one ``rollback`` entry by ``canary`` right after the ``canary`` entry;
- (k5) the gate's decision of the canary's run is ``canary``, and the version's
  ``canary_verdict`` is the canary Decision's verdict;
- (k6) the ledger is quiet (no lease, nothing pending, every run ended), and a replay of
  every report and of the monitor's call changes nothing.

Crash points: each write of the run that starts the canary (event, launch, report,
registration, the gate's commit, its publish) and of ``settle_canary`` (its commit, the
publish, the commit that keeps the message id) is crashed after, once, in a world of its
own; the monitor calls ``settle_canary`` again on its next ticks (the call that finishes a
kept but unpublished Decision).

Races: ``settle_canary`` twice and an operator's promote or rollback at once, released
together, for as many trials as fit in the time bound.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from retrain.config import Canary, Settings
from retrain.gatekeeper.canary import live_of
from retrain.gatekeeper.decisions import Gatekeeper
from retrain.gatekeeper.registry import CanaryState, FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.messages import Decision, Message
from retrain.statedb import Change, Database
from tests.conftest import unique
from tests.reliability.races import race
from tests.reliability.world import Crash, Faults, Plan, World, replay

pytestmark = pytest.mark.integration

SPEC = Canary(percent=10, min_labelled=5, max_regression=0.02)
WORLDS_AT_ONCE = 4
TICKS = 6  # monitor ticks after a crash, at most
LIVE = {
    "promoted": {"2": {"roc_auc": 0.81, "labelled": 12.0, "served": 30.0},
                 "1": {"roc_auc": 0.80, "labelled": 120.0, "served": 300.0}},
    "rolled_back": {"2": {"roc_auc": 0.70, "labelled": 12.0, "served": 30.0},
                    "1": {"roc_auc": 0.80, "labelled": 120.0, "served": 300.0}},
}  # fmt: skip
STATE = CanaryState("2", "1", SPEC.percent, 0.0, 2)


def with_canary(settings: Settings) -> dict[str, Any]:
    base = settings.models["rainfall"].gate
    return {"gate": base.model_copy(update={"canary": SPEC})}


# -- the invariants ------------------------------------------------------------------------


def check_canary(
    registry: FirestoreRegistry,
    db: Database,
    model: str,
    published: list[Message],
    live: dict[str, dict[str, float]] | None,
) -> Decision | None:
    """(k1)-(k5) for the canary of v2 (run of v2) beside v1; the kept canary Decision."""
    head = db.read_path("registry", model)
    records = {r["version"]: r for r in registry.records(model)}
    run_id = str(records["2"]["run_id"])
    gate = registry.decision(model, run_id)
    assert gate is not None, "the canary's run reached no gate decision"
    assert gate["decision"]["verdict"] == "canary", gate["decision"]  # (k5)
    assert records["2"]["verdict"] == "canary"
    kept = registry.canary_decisions(model)
    assert len(kept) <= 1, kept  # (k1)
    decision = Decision.model_validate(kept[0]["decision"]) if kept else None
    ours = [m for m in published if isinstance(m, Decision) and m.stage == "canary"]
    assert all(m == decision for m in ours), (ours, decision)  # (k1)
    audit = [(a["action"], a["to"], a["by"]) for a in registry.audit(model)]
    assert int(head.get("generation", 0)) == len(audit), (head.data, audit)  # (k4)
    assert audit[-1][1] == head.get("champion"), (audit, head.data)
    assert audit[:2] == [("promote", "1", "gatekeeper"), ("canary", "2", "gatekeeper")], audit
    assert registry.unpublished_canaries(model) == [], "a kept canary decision unpublished"
    if decision is None:
        assert ours == [], "published a canary decision that was not kept"
        return None
    assert kept[0]["message_id"], "the canary decision's message id was not kept"  # (k2)
    assert ours, "the kept canary decision was never published"
    assert (decision.run_id, decision.new_version, decision.previous_champion) == (run_id, "2", "1")
    assert records["2"].get("canary_verdict") == decision.verdict  # (k5)
    if live is not None:
        assert decision.live == live_of(live, STATE, "roc_auc")
    if decision.verdict == "rolled_back":  # (k3), (k4)
        assert audit[2] == ("rollback", "1", "canary"), audit
        assert head.get("history") == [], head.data
    else:
        assert all(a[2] != "canary" for a in audit), audit
    assert registry.canary(model) is None
    return decision


# -- crash at every write ----------------------------------------------------------------


def start_and_settle(world: World, live: dict[str, dict[str, float]]) -> None:
    """Run 2's candidate (better offline) starts a canary; the monitor settles it."""
    world.event(2)
    world.settle()
    world.service.gatekeeper.settle_canary(world.model, live)


def ticks(world: World, live: dict[str, dict[str, float]]) -> None:
    """The monitor's next ticks, until the canary is over and its decision published."""
    for _ in range(TICKS):
        with contextlib.suppress(Crash, Exception):
            world.service.gatekeeper.settle_canary(world.model, live)
        if world.registry.canary(world.model) is None and not (
            world.registry.unpublished_canaries(world.model)
        ):
            return
    raise AssertionError(f"{world.model}: the canary did not settle in {TICKS} ticks")


def crashed(
    make_world: Callable[..., World], settings: Settings, verdict: str, crash_at: int | None
) -> tuple[World, int]:
    """The scenario in a fresh world, dying right after the ``crash_at``-th write after
    its prelude (v1 promoted, not crashed); the world and the prelude's writes."""
    world = make_world(Faults(), Plan(scores=[0.80, 0.85, 0.85, 0.85]), **with_canary(settings))
    world.event(1)
    world.settle()
    before = world.faults.writes
    world.faults.crash_at = None if crash_at is None else before + crash_at
    with contextlib.suppress(Crash):
        start_and_settle(world, LIVE[verdict])
    world.settle()
    ticks(world, LIVE[verdict])
    world.settle()
    return world, before


def check_world(world: World, verdict: str) -> None:
    live = LIVE[verdict]
    published = [m for _, m in world.inbox.published]
    decision = check_canary(world.registry, world.db, world.model, published, live)
    assert decision is not None, "the canary was never settled"
    assert decision.verdict == verdict
    assert world.registry.pointer(world.model).version == ("2" if verdict == "promoted" else "1")
    ledger = world.ledger  # (k6)
    assert ledger.lease(world.model) is None
    assert not ledger.has_pending(world.model)
    assert all(r.ended_at is not None for r in ledger.runs(world.model))
    head = world.db.read_path("registry", world.model).data
    replay(world)
    again = world.service.gatekeeper.settle_canary(world.model, live)
    assert again is None, "settled twice"
    assert world.db.read_path("registry", world.model).data == head


@pytest.mark.parametrize("verdict", ["promoted", "rolled_back"])
def test_every_crash_point_of_the_canary_keeps_the_invariants(
    verdict: str, make_world: Callable[..., World], emulated: Settings
) -> None:
    clean, before = crashed(make_world, emulated, verdict, None)
    check_world(clean, verdict)
    writes = clean.faults.writes - before
    # settle_canary's writes are the last three: its one commit, the publish, the id kept.
    settle = (
        "commit " + ("audit, " if verdict == "rolled_back" else "") + "registry, runs, versions"
    )
    assert clean.faults.log[-3:] == [settle, "publish Decision", "commit registry, runs"], (
        clean.faults.log[before:]
    )
    assert writes > 10, f"only {writes} writes"

    def crash(k: int) -> str | None:
        world, _ = crashed(make_world, emulated, verdict, k)
        assert world.faults.crashed, f"no crash at write {k}"
        try:
            check_world(world, verdict)
        except AssertionError as exc:
            return f"crash {world.faults.crashed}: {exc}"
        return None

    with ThreadPoolExecutor(WORLDS_AT_ONCE) as pool:
        failures = [f for f in pool.map(crash, range(1, writes + 1)) if f]
    print(f"\ncanary {verdict}: {writes} crash points, {len(failures)} failures")  # noqa: T201
    assert not failures, "\n".join(failures)


# -- races -------------------------------------------------------------------------------


class Bus:
    def __init__(self) -> None:
        self.published: list[Message] = []

    def publish(self, topic: str, message: Message, **attributes: str) -> str:
        del topic, attributes
        self.published.append(message)
        return f"m{len(self.published)}"


def canary_started(db: Database, registry: FirestoreRegistry, model: str) -> None:
    """v1 serves (promoted by hand); run r2's v2 starts a canary, as the gate's commit does."""
    for n, score in ((1, 0.80), (2, 0.85)):
        registry.register(model, {"model": model, "artifact_uri": f"gs://x/{model}/{n}",
                                  "metrics": {"roc_auc": score}, "run_id": f"r{n}"})  # fmt: skip
    assert registry.promote(model, "1", 0, "gatekeeper", "first")
    gate = Decision(model=model, run_id="r2", verdict="canary", reasons=["better"],
                    new_version="2", previous_champion="1")  # fmt: skip
    kept = {"decision": gate.model_dump(mode="json"), "time": gate.time.isoformat(),
            "message_id": "g2", "requeued": False}  # fmt: skip
    change = Change()
    registry.decide(change, model, registry.run_doc(model, "r2"), registry.head_doc(model), kept,
                    "2", True, "gatekeeper", "run r2", canary=SPEC.percent)  # fmt: skip
    db.commit(change)


TRIALS, SECONDS = 200, 60.0
JITTER = 0.01  # seconds: each operation starts up to this late (the operator 4x), so that
# both orders happen: a settle first (the operator's compare-and-swap fails or comes after)
# and an operator first (the settles find no canary)


def test_settle_races_an_operator_and_itself(emulated: Settings, firestore_client: Any) -> None:
    db = Database(firestore_client)
    operators: dict[str, Callable[[FirestoreRegistry, str], object]] = {
        "rollback": lambda r, m: r.rollback(m, 2, "ops", "back"),
        "promote v1": lambda r, m: r.promote(m, "1", 2, "ops", "v1"),
        "promote v2": lambda r, m: r.promote(m, "2", 2, "ops", "v2 now"),
    }
    began = time.monotonic()
    deadline, trials, seen = began + SECONDS, 0, set()
    while trials < TRIALS and time.monotonic() < deadline:
        model = unique("race")
        verdict = ("promoted", "rolled_back")[trials % 2]
        name = list(operators)[(trials // 2) % len(operators)]
        settings = emulated.model_copy(
            update={"models": {model: emulated.models["rainfall"].model_copy(
                update=with_canary(emulated))}}
        )  # fmt: skip
        registry = FirestoreRegistry(db, "unused")
        bus = Bus()
        gatekeeper = Gatekeeper(settings, FirestoreLedger(db), registry, bus)
        canary_started(db, registry, model)

        def settle(gatekeeper: Gatekeeper = gatekeeper, model: str = model,
                   verdict: str = verdict) -> object:  # fmt: skip
            time.sleep(random.uniform(0, JITTER))  # noqa: S311 (interleavings, not secrets)
            return gatekeeper.settle_canary(model, LIVE[verdict])

        def operate(registry: FirestoreRegistry = registry, model: str = model,
                    name: str = name) -> object:  # fmt: skip
            # Later on average: an operator's move is fewer round trips than a settle's.
            time.sleep(random.uniform(0, 4 * JITTER))  # noqa: S311
            return operators[name](registry, model)

        first, second, operator = race(settle, settle, operate)
        gatekeeper.settle_canary(model, {})  # the next tick (finishes nothing: no crash)
        decision = check_canary(registry, db, model, bus.published, LIVE[verdict])
        assert registry.canary(model) is None, f"{model}: the canary outlived the race"
        # A call may return the Decision that the other kept and it published for it (it
        # finds it unpublished): the same Decision, made once (its time is its identity).
        made = list({d.time: d for d in (first, second) if isinstance(d, Decision)}.values())
        assert len(made) <= 1, f"{model}: two calls both decided: {made}"
        assert made == ([] if decision is None else [decision]), (made, decision)
        operated = operator not in (None, False)
        head = db.read_path("registry", model)
        if decision is None:
            assert operated, f"{model}: neither the monitor nor {name} ended the canary"
            assert head.get("by") == "ops", head.data
        elif not operated:  # the operator's compare-and-swap lost to the settle
            assert head.get("champion") == ("2" if verdict == "promoted" else "1"), head.data
        assert decision is None or decision.verdict == verdict
        seen.add((name, "settled" if decision else "operator", operated))
        trials += 1
        db.client.recursive_delete(db.doc("registry", model))
    took = time.monotonic() - began
    print(f"\ncanary races: {trials} trials in {took:.0f} s, outcomes {sorted(seen)}")  # noqa: T201
    assert trials >= 40, f"only {trials} trials in {SECONDS} s"
    firsts = {first for _, first, _ in seen}
    assert firsts == {"settled", "operator"}, f"the races never went both ways: {seen}"
