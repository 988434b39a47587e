"""Race scenarios, shared by the test tier (a few trials each) and the benchmark (many).

Each scenario builds a world, starts its operations in threads released together by a
barrier (a delivery that raises goes back to the inbox, as Pub/Sub redelivers it), then
settles the world and checks every invariant and a replay.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tests.reliability.world import Delivery, Plan, World, a_run_is_coming, check, replay

__all__ = ["SCENARIOS", "race"]

T = TypeVar("T")

# How long a race in which one operation takes much longer than the others spreads their
# starts (seconds), so that trials land at every point of the long one.
SPREAD = 0.3


def race(*operations: Callable[[], T], spread: float = 0.0) -> list[T]:
    """Run ``operations`` at once (released together, then each after a random delay of up
    to ``spread`` seconds); return what each returned."""
    barrier = threading.Barrier(len(operations))

    def run(operation: Callable[[], T]) -> T:
        barrier.wait()
        time.sleep(random.uniform(0, spread))  # noqa: S311 (an interleaving, not a secret)
        return operation()

    with ThreadPoolExecutor(len(operations)) as pool:
        return [future.result() for future in [pool.submit(run, op) for op in operations]]


def _deliver(world: World, delivery: Delivery) -> Callable[[], None]:
    def go() -> None:
        try:
            world.deliver(delivery)
        except Exception:  # noqa: BLE001 (redelivered, as Pub/Sub does)
            world.inbox.queue.append(Delivery(delivery.kind, delivery.payload))

    return go


def _sweep(world: World) -> Callable[[], None]:
    def go() -> None:
        with contextlib.suppress(Exception):  # the next tick sweeps again
            world.service.sweep()

    return go


def duplicates(world: World) -> None:
    """One event delivered three times at once, with a sweep."""
    request = world.event(1)
    world.inbox.queue.clear()
    race(*[_deliver(world, Delivery("event", request)) for _ in range(3)], _sweep(world))


def burst(world: World) -> None:
    """Eight events at once, with two sweeps: one run at a time, each event once."""
    requests = [world.event(i) for i in range(8)]
    world.inbox.queue.clear()
    race(*[_deliver(world, Delivery("event", r)) for r in requests],
         _sweep(world), _sweep(world))  # fmt: skip


def _held_report(world: World) -> Any:
    """The running job ends and reports; its report, not delivered (the race delivers it)."""
    job = world.launcher.running()[0]
    world.inbox.lost.add(job.run_id)
    world.finish_job(job)
    return next(m for _, m in world.inbox.published if getattr(m, "run_id", None) == job.run_id)


def racing_reports(world: World) -> None:
    """v1 serves; run 2's report is delivered twice at once while an operator rolls back."""
    world.event(1)
    world.settle()
    world.event(2)
    world.step()
    report = _held_report(world)

    def rollback() -> None:
        pointer = world.registry.pointer(world.model)
        with contextlib.suppress(Exception):  # nothing to roll back to, or moved: fine
            world.registry.rollback(world.model, pointer.generation, "ops", "race")

    race(_deliver(world, Delivery("report", report)),
         _deliver(world, Delivery("report", report)), rollback)  # fmt: skip


def takeovers(world: World) -> None:
    """A run's pipeline died: two sweeps and a new event race to take its lease over."""
    world.plan.die.add(0)
    world.event(1)
    world.step()
    world.finish_job(world.launcher.running()[0])
    world.now += 10_000
    request = world.event(2)
    world.inbox.queue.clear()
    race(_sweep(world), _sweep(world), _deliver(world, Delivery("event", request)))


def abandon_and_duplicate(world: World) -> None:
    """A launch failed (abandon) while a duplicate of its event arrives (finding 2)."""
    request = world.event(1)
    world.step()
    lease = world.ledger.lease(world.model)
    assert lease is not None
    world.launcher.jobs.clear()

    def abandon() -> None:  # the failed launch raises: its delivery comes again
        world.ledger.abandon(world.model, lease.run_id, "launch failed")
        world.inbox.queue.append(Delivery("event", request))

    race(abandon, _deliver(world, Delivery("event", request)))


def arrivals(world: World) -> None:
    """Four objects land at once, with a sweep: one arrival starts the run, and the others
    are claimed before its collect (which takes them), or after it, behind its lease
    (checked in the commit), or find the lease moved and take the general path."""
    events = [world.arrival(i) for i in range(1, 5)]
    world.inbox.queue.clear()
    race(*[_deliver(world, Delivery("arrival", e)) for e in events], _sweep(world))


def arrivals_at_release(world: World) -> None:
    """A run's report is delivered (its decision releases the lease, then a trailing run
    starts if events wait) while an object lands, slow to read: it is queued behind the
    run's lease only if the lease is still as read when it commits; else it is claimed
    after the release, and starts a run itself. Without that check (a mutant of
    ``queue_arrival``), about half the trials leave it waiting with no run to come."""
    world.arrival(1)
    world.step()
    report = _held_report(world)
    event = world.arrival(2)
    world.inbox.queue.clear()
    slow_reads(world)
    # The decision takes a while (register, then decide): the arrival lands anywhere in it.
    race(_deliver(world, Delivery("report", report)),
         _deliver(world, Delivery("arrival", event)), spread=SPREAD)  # fmt: skip


def slow_reads(world: World) -> None:
    """The world's arriving objects take up to SPREAD seconds to read: an arrival's check
    then spans other operations' commits (its read of the lease before them, its own
    commit after)."""
    read = world.service._read_checked

    def slow(*args: Any) -> Any:
        time.sleep(random.uniform(0, SPREAD))  # noqa: S311
        return read(*args)

    world.service._read_checked = slow  # type: ignore[method-assign,assignment]


SCENARIOS: dict[str, Callable[[World], None]] = {
    "duplicates": duplicates,
    "burst": burst,
    "racing_reports": racing_reports,
    "takeovers": takeovers,
    "abandon_and_duplicate": abandon_and_duplicate,
    "arrivals": arrivals,
    "arrivals_at_release": arrivals_at_release,
}
# The settings of a scenario's world, where not the shipped model's.
WORLDS: dict[str, dict[str, object]] = {
    "arrivals": {"arrival_policy": "every_arrival"},
    "arrivals_at_release": {"arrival_policy": "every_arrival"},
}


def trial(make_world: Callable[..., World], name: str) -> None:
    world = make_world(plan=Plan(), **WORLDS.get(name, {}))
    SCENARIOS[name](world)
    a_run_is_coming(world)
    world.settle()
    check(world)
    replay(world)
