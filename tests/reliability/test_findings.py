"""One test per finding of issue 11, on the real emulators (the gate's own findings, ties
and staleness by generation, are in tests/unit/test_gate.py).

Each reproduces the situation the finding describes and asserts what must hold instead.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from retrain.events import EventError
from retrain.gatekeeper.decisions import Refusal
from retrain.ledger import FirestoreLedger
from retrain.messages import Decision, EvaluatedModel, MetricsReport, RetrainRequest
from tests.reliability.races import race
from tests.reliability.world import Crash, Plan, World, check, replay

pytestmark = pytest.mark.integration


def _launched(world: World) -> str:
    """The run that holds the lease after the first event."""
    world.event(1)
    world.step()
    lease = world.ledger.lease(world.model)
    assert lease is not None
    return lease.run_id


# -- 1. a takeover that dies between its writes ---------------------------------------------


def test_1_a_takeover_that_dies_right_after_its_commit_loses_no_event(
    make_world: Callable[..., World],
) -> None:
    """The takeover is one commit (lease, old run abandoned, its events requeued): dying
    right after it leaves the events waiting, never "done" with nobody to run them."""
    world = make_world(plan=Plan(die={0}))
    first = _launched(world)
    world.finish_job(world.launcher.jobs[first])  # the pipeline dies without a report
    world.now += 601
    world.faults.crash_at = world.faults.writes + 1  # dies right after the takeover commits
    with pytest.raises(Crash, match="commit ledger, runs"):
        world.service.sweep()
    assert world.ledger.claim(world.events[0]) == "pending", "the redelivery finds it waiting"
    world.settle()
    check(world)
    covering = world.ledger.event(world.model, world.events[0].dedupe_key)
    assert covering is not None
    assert covering["run_id"] != first


# -- 2. a duplicate racing a requeue -------------------------------------------------------


@pytest.mark.parametrize("trial", range(3))  # (tests/reliability/races.py: 20 more)
def test_2_a_duplicate_racing_an_abandon_never_loses_the_event(
    make_world: Callable[..., World], trial: int
) -> None:
    """abandon() (a launch that failed) and a duplicate delivery of its event, together:
    the event ends waiting (or run again), in every trial."""
    world = make_world()
    run_id = _launched(world)
    world.launcher.jobs.clear()  # (as if the launch had failed after gathering)

    def abandon() -> None:
        world.ledger.abandon(world.model, run_id, "launch failed")

    def duplicate() -> str:
        return world.ledger.claim(world.events[0])

    _, answer = race(abandon, duplicate)
    assert answer in ("pending", "done")
    assert world.ledger.has_pending(world.model), f"trial {trial}: the event was lost"
    world.inbox.queue.clear()
    world.settle()
    check(world)


# -- 3. cloud single flight after lease_seconds ---------------------------------------------


def test_3_a_job_that_outlives_its_lease_keeps_it_and_no_second_job_starts(
    make_world: Callable[..., World],
) -> None:
    world = make_world()
    first = _launched(world)
    lease = world.ledger.lease(world.model)
    assert lease is not None
    world.now = lease.expires_at + 3600  # the job runs an hour past its lease
    world.event(2)
    world.step()  # the next event finds an expired lease: the job still runs
    world.service.sweep()
    assert list(world.launcher.jobs) == [first], "a second job started beside the first"
    extended = world.ledger.lease(world.model)
    assert extended is not None
    assert extended.run_id == first
    assert extended.expires_at > world.now
    world.settle()
    check(world)
    assert len(world.launcher.jobs) == 2  # the second event ran after the first job


def test_3_a_job_that_ended_without_a_report_has_its_events_run_again(
    make_world: Callable[..., World],
) -> None:
    world = make_world(plan=Plan(die={0}))
    first = _launched(world)
    world.finish_job(world.launcher.jobs[first])
    world.service.sweep()  # within one sweep interval, lease or no lease
    second = world.ledger.lease(world.model)
    assert second is not None
    assert second.run_id != first
    abandoned = world.ledger.run(world.model, first)
    assert abandoned is not None
    assert abandoned.state == "abandoned"
    world.settle()
    check(world)
    decided = [d["decision"]["run_id"] for d in world.registry.decisions(world.model)]
    assert decided == [second.run_id]


# -- 4. racing deliveries of one report -----------------------------------------------------


@pytest.mark.parametrize("trial", range(3))  # (tests/reliability/races.py: 20 more)
def test_4_concurrent_deliveries_of_one_report_record_what_the_pointer_did(
    make_world: Callable[..., World], trial: int
) -> None:
    world = make_world()
    world.event(1)
    world.settle()  # v1 serves
    world.event(2)
    world.step()
    job = world.launcher.running()[0]
    world.inbox.lost.add(job.run_id)  # deliver it by hand, twice at once
    world.finish_job(job)
    report = next(m for _, m in world.inbox.published if isinstance(m, MetricsReport)
                  and m.run_id == job.run_id)  # fmt: skip

    def deliver() -> Decision | Refusal:
        return world.service.gatekeeper.report(report)

    answers = race(deliver, deliver)
    assert all(isinstance(a, Decision) and a.verdict == "promoted" for a in answers), (
        f"trial {trial}: {answers}"
    )
    assert world.registry.pointer(world.model).version == "2"
    published = [m for _, m in world.inbox.published if isinstance(m, Decision)
                 and m.run_id == job.run_id]  # fmt: skip
    assert published
    assert {d.verdict for d in published} == {"promoted"}
    world.settle()
    check(world)


# -- 6. the gate cannot be bypassed ---------------------------------------------------------


def _report(world: World, run_id: str, artifact: str) -> MetricsReport:
    return MetricsReport(
        model=world.model, run_id=run_id, request_id="k", reason="manual", status="succeeded",
        candidate=EvaluatedModel(artifact_uri=artifact, metrics={"roc_auc": 0.99,
                                                                 "accuracy": 0.99, "rows": 900.0}),
    )  # fmt: skip


def test_6_a_report_for_a_run_the_ledger_never_launched_is_refused(
    make_world: Callable[..., World],
) -> None:
    world = make_world()
    data = f"gs://{world.settings.buckets.data}/{world.model}/evil/model"
    outcome = world.service.report(_report(world, f"{world.model}-forged", data))
    assert outcome.action == "refused"
    assert "not launched by the ledger" in outcome.detail
    assert world.registry.pointer(world.model).version is None
    assert world.registry.records(world.model) == []
    refused = world.registry.refused(world.model)
    assert [r["run_id"] for r in refused] == [f"{world.model}-forged"]


def test_6_a_candidate_outside_its_run_prefix_is_refused_and_the_run_still_decides(
    make_world: Callable[..., World],
) -> None:
    world = make_world()
    run_id = _launched(world)
    data = f"gs://{world.settings.buckets.data}/{world.model}/evil/model"
    outcome = world.service.report(_report(world, run_id, data))
    assert outcome.action == "refused"
    assert "outside the run's own prefix" in outcome.detail
    lease = world.ledger.lease(world.model)
    assert lease is not None
    assert lease.run_id == run_id, "a forged report must not end the real run"
    world.settle()  # the real report comes, and is decided
    check(world)
    assert world.registry.pointer(world.model).version == "1"


@pytest.mark.parametrize(
    "uri",
    [
        "/etc/passwd",
        "http://example.com/x.csv",
        "gs://retrain-data/other-model/x.csv",
        "gs://another-bucket/{model}/x.csv",
        "gs://retrain-data/{model}/../other/x.csv",
        "gs://retrain-data/{model}/",
    ],
)
def test_6_data_uris_must_be_the_models_own_objects(
    make_world: Callable[..., World], uri: str
) -> None:
    world = make_world()
    bad = uri.format(model=world.model).replace("retrain-data", world.settings.buckets.data)
    request = RetrainRequest(model=world.model, reason="manual", data_uris=[bad],
                             dedupe_key="manual-1", trigger_event_id="1")  # fmt: skip
    with pytest.raises(EventError, match=r"data_uris: .* is not an object under"):
        world.service.request(request)
    assert world.ledger.event(world.model, "manual-1") is None


# -- 7. versions ----------------------------------------------------------------------------


def test_7_concurrent_registrations_number_versions_without_gaps_in_order(
    make_world: Callable[..., World],
) -> None:
    world = make_world()
    records = [{"run_id": f"{world.model}-run-{i}", "artifact_uri": f"gs://x/{i}", "metrics": {},
                "registered_at": ""} for i in range(12)]  # fmt: skip
    barrier = threading.Barrier(6)

    def register(record: dict[str, Any]) -> str:
        if record["run_id"].endswith(("-0", "-1", "-2", "-3", "-4", "-5")):
            barrier.wait()
        return world.registry.register(world.model, record)

    with ThreadPoolExecutor(6) as pool:
        twice = list(pool.map(register, records + records))  # every report delivered twice
    versions = world.registry.records(world.model)
    assert [int(v["number"]) for v in versions] == list(range(1, 13))
    assert len({v["run_id"] for v in versions}) == 12
    assert twice[:12] == twice[12:], "a redelivery got another version"


# -- 8. reports, stale rejections, rollbacks -------------------------------------------------


def test_8_the_exit_handler_republishes_the_kept_report_not_a_failure(
    make_world: Callable[..., World],
) -> None:
    from components.runs import RunContext, failure_report  # noqa: PLC0415

    world = make_world()
    run_id = _launched(world)
    job = world.launcher.jobs[run_id]
    world.inbox.lost.add(run_id)
    world.finish_job(job)  # kept and published (the message is lost on its way)
    run = RunContext.parse(world.model, run_id, "k", "data")
    published = failure_report(world.settings, run, "FAILED", "the exit handler ran", world.inbox)
    assert published is not None
    assert published[0].status == "succeeded", "the exit handler must not contradict the run"


def test_8_a_report_lost_for_good_is_decided_by_the_sweep(
    make_world: Callable[..., World],
) -> None:
    world = make_world(plan=Plan(lose_report={0}))
    run_id = _launched(world)
    world.finish_job(world.launcher.jobs[run_id])
    assert not world.inbox.queue
    world.service.sweep()
    decision = world.registry.decision(world.model, run_id)
    assert decision is not None
    assert decision["decision"]["verdict"] == "promoted"
    assert world.ledger.lease(world.model) is None


def test_8_an_invalid_kept_report_fails_the_run_and_frees_the_model(
    make_world: Callable[..., World],
) -> None:
    from retrain import blobstore  # noqa: PLC0415

    world = make_world()
    run_id = _launched(world)
    world.launcher.jobs[run_id].state = "ended"
    prefix = world.settings.run_prefix(world.model, run_id)
    blobstore.write_bytes(f"{prefix}/report.json", b'{"report": {"model": 1}}', world.gcs)
    world.service.sweep()
    decision = world.registry.decision(world.model, run_id)
    assert decision is not None
    assert decision["decision"]["verdict"] == "rejected"
    assert "is not a valid report" in decision["decision"]["reasons"][0]
    assert world.ledger.lease(world.model) is None


def test_8_a_stale_rejection_runs_its_events_again(make_world: Callable[..., World]) -> None:
    world = make_world()
    world.event(1)
    world.settle()  # v1
    world.event(2)
    world.settle()  # v2 (better)
    world.event(3)
    world.step()
    job = world.launcher.running()[0]
    world.finish_job(job)  # evaluated against v2 ...
    ops = world.registry
    assert ops.rollback(world.model, ops.pointer(world.model).generation, "ops", "bad v2") == "1"
    world.settle()  # ... decided stale; event 3 runs again, against v1
    decision = ops.decision(world.model, job.run_id)
    assert decision is not None
    assert decision["requeued"]
    assert any(r.startswith("stale:") for r in decision["decision"]["reasons"])
    covering = world.ledger.event(world.model, world.events[2].dedupe_key)
    assert covering is not None
    assert covering["run_id"] != job.run_id
    check(world)


def test_8_two_rollbacks_go_two_steps_back(make_world: Callable[..., World]) -> None:
    world = make_world(plan=Plan(scores=[0.80, 0.85, 0.90]))
    for i in (1, 2, 3):
        world.event(i)
        world.settle()
    ops = world.registry
    assert ops.pointer(world.model).version == "3"
    assert ops.rollback(world.model, ops.pointer(world.model).generation, "ops", "r1") == "2"
    assert ops.rollback(world.model, ops.pointer(world.model).generation, "ops", "r2") == "1"
    assert ops.champion_record(world.model)["history"] == []  # type: ignore[index]
    stale_generation = ops.pointer(world.model).generation - 1
    assert ops.rollback(world.model, stale_generation, "ops", "late") is None


# -- 9. no object (document) is rewritten per event ---------------------------------------


def test_9_a_burst_of_events_rewrites_no_document_per_event(
    make_world: Callable[..., World],
) -> None:
    world = make_world()
    for i in range(30):
        world.event(i)
    world.settle()
    check(world)
    replay(world)
    commits = [w for w in world.faults.log if w.startswith("commit")]
    model_doc = [w for w in commits if "ledger" in w.split(" ", 1)[1].split(", ")]
    assert len(world.launcher.jobs) <= 3
    assert len(model_doc) < 30, f"the model's document was written {len(model_doc)} times"


def test_the_harness_sees_a_lost_event(make_world: Callable[..., World]) -> None:
    """The invariant check can fail: an event deleted behind the protocol's back is found."""
    world = make_world()
    world.event(1)
    world.settle()
    ledger: FirestoreLedger = world.ledger
    ref = ledger.db.doc("ledger", world.model, "runs", world.ledger.runs(world.model)[0].run_id)
    ref.update({"events": []})
    with pytest.raises(AssertionError, match="kept by"):
        check(world)


def test_9_the_emulator_enforces_every_precondition_the_protocol_relies_on(
    firestore_client: Any,
) -> None:
    """fake-gcs-server ignored preconditions on DELETE, so the old tests proved nothing.
    The Firestore emulator refuses each write whose precondition fails: a create of a
    document that exists, an update or a delete of one that changed since it was read."""
    from retrain.statedb import Change, Conflict, Database, Doc  # noqa: PLC0415

    db = Database(firestore_client)
    ref = db.doc("preconditions", uuid.uuid4().hex)
    create = Change()
    create.put(Doc(ref, None), {"n": 1})
    db.commit(create)
    with pytest.raises(Conflict):
        db.commit(create)  # it exists now
    stale = db.read(ref)
    bump = Change()
    bump.put(stale, {"n": 2})
    db.commit(bump)
    for write in ("put", "delete"):
        late = Change()
        if write == "put":
            late.put(stale, {"n": 3})
        else:
            late.delete(stale)
        with pytest.raises(Conflict):
            db.commit(late)
    assert db.read(ref).data == {"n": 2}
    both = Change()  # one failing write fails the whole commit
    both.put(Doc(db.doc("preconditions", uuid.uuid4().hex), None), {"n": 1})
    both.put(stale, {"n": 4})
    with pytest.raises(Conflict):
        db.commit(both)
    assert not db.read(both.writes[0][1].ref).exists


def test_6_a_report_from_the_models_own_pipeline_schedule_is_adopted(
    make_world: Callable[..., World],
) -> None:
    """``schedule.via: pipeline_schedule``: the schedule's jobs run outside the ledger; the
    launcher vouches for them (a job that the model's schedule started) and the report is
    decided. A job the launcher does not vouch for is still refused."""
    from retrain.config import Schedule  # noqa: PLC0415

    world = make_world()
    spec = world.settings.models[world.model]
    world.settings = world.settings.model_copy(update={"models": {world.model: spec.model_copy(
        update={"schedule": Schedule(cron="0 3 * * *", via="pipeline_schedule")})}})  # fmt: skip
    world.service.settings = world.service.gatekeeper.settings = world.settings
    world.launcher.schedule_job(world.model, f"{world.model}-scheduled-1")
    world.settle()
    decided = world.registry.decision(world.model, f"{world.model}-scheduled-1")
    assert decided is not None
    assert decided["decision"]["verdict"] == "promoted"
    check(world)
    forged = world.service.report(_report(world, f"{world.model}-scheduled-2",
                                          "gs://x/model"))  # fmt: skip
    assert forged.action == "refused"
