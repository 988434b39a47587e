"""The ledger's lease on the real storage emulator: takeover after expiry, and renewal."""

from __future__ import annotations

from typing import Any

import pytest

from retrain.ledger import GcsLedger
from retrain.messages import RetrainRequest
from tests.conftest import unique

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_expired_lease_is_taken_over_and_its_events_wait_again(bucket: Any) -> None:
    clock = Clock()
    ledger = GcsLedger(bucket.name, bucket.client, clock=clock)
    model = unique("m")
    request = RetrainRequest(model=model, reason="data", dedupe_key="k-1", trigger_event_id="1")
    assert ledger.claim(request) == "new"
    assert ledger.try_acquire(model, "run-a", ttl=10).acquired
    assert [r.dedupe_key for r in ledger.collect(model, "run-a")] == ["k-1"]
    assert ledger.claim(request) == "done"  # covered by run-a

    assert not ledger.try_acquire(model, "run-b", ttl=10).acquired  # run-a holds it
    assert ledger.renew(model, "run-a", ttl=10)  # run-a is alive and says so
    clock.now += 9
    assert not ledger.try_acquire(model, "run-b", ttl=10).acquired  # renewed: not expired
    clock.now += 20  # run-a died without a report and stopped renewing
    taken = ledger.try_acquire(model, "run-b", ttl=10)

    assert taken.acquired
    assert not ledger.renew(model, "run-a", ttl=10)  # the dead run cannot take it back
    abandoned = ledger.run(model, "run-a")
    assert abandoned is not None
    assert abandoned.state == "abandoned"
    # run-a's event was requeued: run-b covers it, and exactly once
    assert [r.dedupe_key for r in ledger.collect(model, "run-b")] == ["k-1"]
    assert ledger.collect(model, "run-b") == []
    assert ledger.finish(model, "run-b", "succeeded")
    assert ledger.lease(model) is None


def test_a_run_whose_launch_failed_gives_its_events_back(bucket: Any) -> None:
    """A cloud launcher gathers the events, then the API call fails: nothing is lost, and
    the redelivery that the failure causes launches them."""
    ledger = GcsLedger(bucket.name, bucket.client)
    model = unique("m")
    request = RetrainRequest(model=model, reason="data", dedupe_key="k-1", trigger_event_id="1")
    assert ledger.claim(request) == "new"
    assert ledger.try_acquire(model, "run-a", ttl=60).acquired
    assert [r.dedupe_key for r in ledger.collect(model, "run-a")] == ["k-1"]

    assert ledger.abandon(model, "run-a", "launch failed: ServiceUnavailable: 503")

    assert ledger.lease(model) is None
    record = ledger.run(model, "run-a")
    assert record is not None
    assert (record.state, record.error) == ("abandoned", "launch failed: ServiceUnavailable: 503")
    assert ledger.claim(request) == "pending", "the redelivery finds it waiting, not done"
    assert ledger.try_acquire(model, "run-b", ttl=60).acquired
    assert [r.dedupe_key for r in ledger.collect(model, "run-b")] == ["k-1"]
    assert ledger.claim(request) == "done"


def test_a_launch_holds_the_lease_for_the_run_and_a_relaunch_hands_it_over(bucket: Any) -> None:
    clock = Clock()
    ledger = GcsLedger(bucket.name, bucket.client, clock=clock)
    model = unique("m")
    assert ledger.try_acquire(model, "run-a", ttl=30).acquired  # for the gathering only
    assert ledger.renew(model, "run-a", ttl=3600)  # extended before the job is submitted
    ledger.launched(model, "run-a", "projects/p/locations/l/pipelineJobs/j-1")
    lease = ledger.lease(model)
    assert lease is not None
    assert (lease.run_id, lease.expires_at) == ("run-a", clock.now + 3600)
    record = ledger.run(model, "run-a")
    assert record is not None
    assert record.launched_as == "projects/p/locations/l/pipelineJobs/j-1"

    clock.now += 3601  # run-a's pipeline outlived its lease; run-b takes over ...
    assert ledger.try_acquire(model, "run-b", ttl=30).acquired
    # ... finds run-a's pipeline still running, and gives the lease back to run-a,
    assert ledger.hand_over(model, "run-b", "run-a", ttl=3600, why="launched already as j-1")
    lease = ledger.lease(model)
    assert lease is not None
    assert lease.run_id == "run-a"
    b = ledger.run(model, "run-b")
    assert b is not None
    assert (b.state, b.error) == ("abandoned", "launched already as j-1")
    assert not ledger.try_acquire(model, "run-c", ttl=30).acquired  # one run at a time
    assert ledger.finish(model, "run-a", "succeeded")  # run-a's report releases it
    assert ledger.lease(model) is None


def test_no_hand_over_to_a_run_that_already_reported(bucket: Any) -> None:
    """Its job still shows RUNNING for a moment after the exit handler reported: the lease
    must not go back to it, or nothing would release it for lease_seconds."""
    clock = Clock()
    ledger = GcsLedger(bucket.name, bucket.client, clock=clock)
    model = unique("m")
    assert ledger.try_acquire(model, "run-a", ttl=60).acquired
    clock.now += 61
    assert ledger.try_acquire(model, "run-b", ttl=60).acquired  # takes over run-a
    assert not ledger.finish(model, "run-a", "succeeded")  # run-a's report: not the holder
    record = ledger.run(model, "run-a")
    assert record is not None
    assert record.finished_at == clock.now

    assert not ledger.hand_over(model, "run-b", "run-a", ttl=3600, why="job still RUNNING")

    assert ledger.lease(model) is None, "released, not handed to a run that is over"
