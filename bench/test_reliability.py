"""Reliability at scale: 200 trials of each race scenario, and a longer model exploration.

The test tier (tests/reliability) runs 20 trials of each race and a short exploration;
this prints the figures that docs/reliability.md quotes: trials, failures, time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.reliability.conftest import emulated, firestore_client, make_world, storage
from tests.reliability.races import SCENARIOS, trial
from tests.reliability.test_model import Protocol
from tests.reliability.world import World

__all__ = ["emulated", "firestore_client", "make_world", "storage"]

pytestmark = pytest.mark.bench

TRIALS = 200


@pytest.mark.timeout(900)  # 200 trials take 1-2 minutes on a quiet 2-core machine
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_races_at_scale(name: str, make_world: Callable[..., World]) -> None:
    failures: list[str] = []
    started = time.perf_counter()
    for n in range(TRIALS):
        try:
            trial(make_world, name)
        except AssertionError as exc:
            failures.append(f"trial {n}: {exc}")
    took = time.perf_counter() - started
    print(f"\nrace {name}: {TRIALS} trials, {len(failures)} failures, {took:.0f} s")
    assert not failures, "\n".join(failures[:5])


@pytest.mark.timeout(1800)  # 200 interleavings take about 5 minutes on a quiet 2-core machine
def test_model_at_scale(make_world: Callable[..., World]) -> None:
    Protocol.make_world = staticmethod(make_world)
    run = Protocol.TestCase
    examples = 200
    run.settings = settings(
        max_examples=examples,
        stateful_step_count=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,  # a fresh random exploration each time (the test tier's is fixed)
        phases=(Phase.explicit, Phase.reuse, Phase.generate),  # as the test tier: no shrinking
    )
    started = time.perf_counter()
    run().runTest()
    took = time.perf_counter() - started
    print(f"\nmodel: {examples} interleavings of up to 60 steps, 0 failures, {took:.0f} s")
