"""Race scenarios, shared by the test tier (a few trials each) and the benchmark (many).

Each scenario builds a world, starts its operations in threads released together by a
barrier (a delivery that raises goes back to the inbox, as Pub/Sub redelivers it), then
settles the world and checks every invariant and a replay.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tests.reliability.world import Delivery, Plan, World, check, replay

__all__ = ["SCENARIOS", "race"]

T = TypeVar("T")


def race(*operations: Callable[[], T]) -> list[T]:
    """Run ``operations`` at once (released together); return what each returned."""
    barrier = threading.Barrier(len(operations))

    def run(operation: Callable[[], T]) -> T:
        barrier.wait()
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


def racing_reports(world: World) -> None:
    """v1 serves; run 2's report is delivered twice at once while an operator rolls back."""
    world.event(1)
    world.settle()
    world.event(2)
    world.step()
    job = world.launcher.running()[0]
    world.inbox.lost.add(job.run_id)
    world.finish_job(job)
    report = next(m for _, m in world.inbox.published if getattr(m, "run_id", None) == job.run_id)

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

    def abandon() -> None:
        world.ledger.abandon(world.model, lease.run_id, "launch failed")

    race(abandon, _deliver(world, Delivery("event", request)))


SCENARIOS: dict[str, Callable[[World], None]] = {
    "duplicates": duplicates,
    "burst": burst,
    "racing_reports": racing_reports,
    "takeovers": takeovers,
    "abandon_and_duplicate": abandon_and_duplicate,
}


def trial(make_world: Callable[..., World], name: str) -> None:
    world = make_world(plan=Plan())
    SCENARIOS[name](world)
    world.settle()
    check(world)
    replay(world)
