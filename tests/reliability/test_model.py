"""A model of the protocol, explored by hypothesis: random interleavings of events,
objects that land (checked on arrival), duplicates, deliveries, pipelines that succeed,
fail, die or lose their report, sweeps at any time, operators who roll back or promote,
and crashes after any write, all driving the real ledger, gatekeeper and service on the
emulators.

Single flight, and that what waits has a run to come, are checked after every step; at
the end the world settles (everything delivered, every job ended, swept until quiet) and
every invariant and a replay are checked (tests/reliability/world.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.reliability.world import (
    Crash,
    Delivery,
    Faults,
    Plan,
    World,
    a_run_is_coming,
    check,
    replay,
)

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 12  # bench/test_reliability.py explores 200


# Each action may die after its first or second write (half the time, it does not).
CRASH = st.one_of(st.none(), st.integers(1, 2))


class Protocol(RuleBasedStateMachine):
    make_world: Callable[..., World]

    @initialize()
    def start(self) -> None:
        self.world = self.make_world(Faults(), Plan(scores=[0.8, 0.85, 0.83, 0.9, 0.9, 0.95]),
                                     lease_seconds=300.0,
                                     arrival_policy="every_arrival")  # fmt: skip
        self.sent = 0

    def _survive(self, act: Callable[[], Any], crash: int | None = None) -> None:
        """Run ``act``, dying after its ``crash``-th write if it makes that many; a crash or
        an error leaves what it handled to be redelivered."""
        faults = self.world.faults
        faults.crash_at = None if crash is None else faults.writes + crash
        try:
            with contextlib.suppress(Crash, Exception):  # the world redelivers
                act()
        finally:
            faults.crash_at = None

    @rule()
    def new_event(self) -> None:
        self.sent += 1
        self.world.event(self.sent)

    @rule()
    def new_arrival(self) -> None:
        """An object lands in the data bucket: its notification is checked on arrival."""
        self.sent += 1
        self.world.arrival(self.sent)

    @precondition(lambda self: self.sent > 0)
    @rule(data=st.data())
    def duplicate_event(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(1, self.sent), label="event")
        request = self.world.events[i - 1]
        landed = [e for e in self.world.arrivals if e.dedupe_key == request.dedupe_key]
        again = Delivery("arrival", landed[0]) if landed else Delivery("event", request)
        self.world.inbox.queue.append(again)

    @precondition(lambda self: bool(self.world.inbox.queue))
    @rule(crash=CRASH)
    def deliver(self, crash: int | None) -> None:
        self._survive(self.world.step, crash)

    @precondition(lambda self: bool(self.world.launcher.running()))
    @rule(how=st.sampled_from(["report", "die", "fail", "lose"]), crash=CRASH)
    def end_a_job(self, how: str, crash: int | None) -> None:
        job = self.world.launcher.running()[0]
        order = list(self.world.launcher.jobs).index(job.run_id)
        plan = self.world.plan
        {"fail": plan.fail, "die": plan.die, "lose": plan.lose_report}.get(how, set()).add(order)
        self._survive(lambda: self.world.finish_job(job), crash)
        job.state = "ended"

    @rule(far=st.booleans(), crash=CRASH)
    def sweep(self, far: bool, crash: int | None) -> None:
        self._survive(lambda: self.world.sweep(advance=None if far else 1.0), crash)

    @rule(data=st.data(), crash=CRASH)
    def operator(self, data: st.DataObject, crash: int | None) -> None:
        registry, model = self.world.registry, self.world.model
        pointer = registry.pointer(model)
        records = registry.records(model)
        if data.draw(st.booleans(), label="rollback") or not records:
            act: Callable[[], Any] = lambda: registry.rollback(  # noqa: E731
                model, pointer.generation, "ops", "model")  # fmt: skip
        else:
            version = data.draw(st.sampled_from([r["version"] for r in records]), label="v")
            act = lambda: registry.promote(  # noqa: E731
                model, version, pointer.generation, "ops", "model")  # fmt: skip
        self._survive(act, crash)

    @invariant()
    def one_pipeline_per_model(self) -> None:
        assert self.world.launcher.overlaps == [], self.world.launcher.overlaps

    @invariant()
    def what_waits_has_a_run_coming(self) -> None:
        a_run_is_coming(self.world)

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        self.world.faults.crash_at = None
        self.world.settle()
        check(self.world)
        replay(self.world)


def test_the_protocol_keeps_its_invariants_in_any_interleaving(
    make_world: Callable[..., World],
) -> None:
    Protocol.make_world = staticmethod(make_world)
    run = Protocol.TestCase
    run.settings = settings(
        max_examples=MAX_EXAMPLES,
        stateful_step_count=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=True,  # the same interleavings in every run: a failure is reproducible
        database=None,
        # No shrinking: a replay of the real protocol (random run ids, emulator timing) may
        # draw differently, and hypothesis would then report a flaky strategy instead of
        # the invariant that failed. The failing interleaving is printed as found.
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
    )
    run().runTest()
