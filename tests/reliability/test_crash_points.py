"""Crash at every write: each scenario, for every k, dies right after its k-th write.

A scenario is first run without a crash to count its writes (Firestore commits, publishes,
job submissions, objects written or copied): N. Then, for each k in 1..N, a fresh world
runs the same scenario and dies right after its k-th write; what was being handled is
redelivered, the sweep runs, and the world goes on until quiet. The invariants
(tests/reliability/world.py, ``check``) must hold in every one of them, and a replay of
every event and report must change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.reliability.world import Crash, Faults, Plan, World, check, replay

pytestmark = pytest.mark.integration

Scenario = Callable[[World], None]
WORLDS_AT_ONCE = 4


def event_to_decision(world: World) -> None:
    """Three events: the first starts a run; two arrive while it runs and share the
    trailing run. Both runs report; the first is promoted, the second decided."""
    world.event(1)
    world.step()  # the first event: claim, lease, gather, launch
    world.event(2)
    world.event(3)
    world.settle()


def arrivals(world: World) -> None:
    """Three objects land, each checked on arrival: the first starts a run (record and
    claim, lease, settle); two arrive while it runs (record, settle and claim behind its
    lease, in one commit) and share the trailing run."""
    world.arrival(1)
    world.step()
    world.arrival(2)
    world.arrival(3)
    world.settle()


def takeover(world: World) -> None:
    """The first run's pipeline dies without a report: the sweep takes its lease over and
    its event runs again, with one that arrived meanwhile."""
    world.plan.die.add(0)
    world.event(1)
    world.step()
    world.event(2)
    world.settle()


def failed_launch(world: World) -> None:
    """The pipelines API refuses the first submit: the run is abandoned, its event waits
    again, and the redelivery launches it."""
    world.launcher.fail_submits = 1
    world.event(1)
    world.settle()


def lost_report(world: World) -> None:
    """The report's message is lost after the run kept it: the sweep decides from it."""
    world.plan.lose_report.add(0)
    world.event(1)
    world.settle()


def two_champions(world: World) -> None:
    """(A prelude, not crashed:) v1, then v2 serves."""
    world.plan.scores = [0.80, 0.85, 0.90]
    for i in (1, 2):
        world.event(i)
        world.settle()


def stale(world: World) -> None:
    """A run is evaluated against v2; an operator rolls back to v1 before its report is
    decided: the report is stale, rejected, and its event runs again, against v1."""
    world.event(3)
    world.step()
    for job in world.launcher.running():  # (none, if the crash hit the delivery)
        world.finish_job(job)
    _operator(world, lambda: world.registry.rollback(
        world.model, world.registry.pointer(world.model).generation, "ops", "bad v2"))  # fmt: skip
    world.settle()


def operator_moves(world: World) -> None:
    """An operator promotes v1 by hand, then rolls back twice (each command retried by
    hand until it goes through), while a run is decided."""
    registry, model = world.registry, world.model
    world.event(3)
    world.step()
    _operator(world, lambda: registry.promote(
        model, "1", registry.pointer(model).generation, "ops", "v1 by hand"))  # fmt: skip
    world.settle()
    for _ in range(2):
        _operator(world, lambda: registry.rollback(
            model, registry.pointer(model).generation, "ops", "step back"))  # fmt: skip


def _operator(world: World, act: Callable[[], object]) -> None:
    """An operator's command, tried again by hand until it goes through."""
    for _ in range(5):
        try:
            act()
        except (Crash, Exception):  # noqa: BLE001, S112 (the operator runs it again)
            continue
        return


def failed_run(world: World) -> None:
    """The pipeline fails (its exit handler reports it): decided as rejected."""
    world.plan.fail.add(0)
    world.event(1)
    world.settle()


def nothing(world: World) -> None:
    del world


# name: (prelude, run without a crash; the scenario, crashed at each of its writes)
SCENARIOS: dict[str, tuple[Scenario, Scenario]] = {
    "event_to_decision": (nothing, event_to_decision),
    "arrivals": (nothing, arrivals),
    "takeover": (nothing, takeover),
    "failed_launch": (nothing, failed_launch),
    "lost_report": (nothing, lost_report),
    "failed_run": (nothing, failed_run),
    "stale": (two_champions, stale),
    "operator_moves": (two_champions, operator_moves),
}


# The settings of a scenario's world, where not the shipped model's.
WORLDS: dict[str, dict[str, Any]] = {"arrivals": {"arrival_policy": "every_arrival"}}
# Writes a scenario must make (so that it is crashed right after each): a first delivery
# records the arrival and claims its event in one commit; one behind the run's lease also
# settles it there, checking the lease (the model's document) as read.
MUST_WRITE: dict[str, tuple[str, ...]] = {
    "arrivals": ("commit arrivals, events", "commit arrivals, events, ledger"),
}


def run_scenario(
    make_world: Callable[..., World], name: str, crash_at: int | None
) -> tuple[World, int]:
    """The scenario in a fresh world, dying after the ``crash_at``-th write of its body;
    the world and the number of writes its prelude made."""
    prelude, body = SCENARIOS[name]
    world = make_world(Faults(), Plan(), **WORLDS.get(name, {}))
    prelude(world)
    before = world.faults.writes
    world.faults.crash_at = None if crash_at is None else before + crash_at
    with contextlib.suppress(Crash):  # it hit a step the scenario drives: the world goes on
        body(world)
    world.settle()
    return world, before


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_crash_point_keeps_the_invariants(
    name: str, make_world: Callable[..., World]
) -> None:
    clean, before = run_scenario(make_world, name, None)
    check(clean)
    writes = clean.faults.writes - before
    assert writes > 5, f"{name}: only {writes} writes; the scenario did not run"
    for write in MUST_WRITE.get(name, ()):
        assert write in clean.faults.log, f"{name}: no {write!r} to crash after"

    def crash(k: int) -> str | None:
        world, _ = run_scenario(make_world, name, k)
        assert world.faults.crashed, f"{name}: no crash at write {k} of {writes}"
        try:
            check(world)
            replay(world)
        except AssertionError as exc:
            return f"crash {world.faults.crashed}: {exc}"
        return None

    # Each crash point in a world of its own: a few side by side (they wait on the emulators).
    with ThreadPoolExecutor(WORLDS_AT_ONCE) as pool:
        failures = [f for f in pool.map(crash, range(1, writes + 1)) if f]
    print(f"\n{name}: {writes} crash points, {len(failures)} failures")  # noqa: T201
    assert not failures, "\n".join(failures)
