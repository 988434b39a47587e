"""Events start exactly one run each, on the real stack: notifications, duplicates, bursts,
a crash mid-request, drift, schedule, manual and dead-letter replay, and the sweep that
frees a model from a dead run (only from a dead one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from google.cloud import pubsub_v1

from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger, RunRecord
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import http_ok, spawn, stop, wait_until
from retrain.messages import DriftAlert, ScheduleMessage, decode, encode
from retrain.operator import data_notification
from retrain.statedb import Database
from tests.conftest import (
    QUICK_MODEL,
    ROOT,
    free_ports,
    rainfall,
    settled,
    unique,
    upload,
    write_config,
)

pytestmark = pytest.mark.integration

RAINFALL = rainfall(3000)
QUICK = QUICK_MODEL
MODELS = {
    "single": QUICK,
    "storm": QUICK,
    "burst": {**QUICK, "coalesce_seconds": 2.0},
    "crash": QUICK,
    "drifty": {
        **QUICK,
        "arrival_policy": "on_drift",
        "drift": {**QUICK["drift"], "min_drifted_features": 2},
    },
    "sched": QUICK,
    "dead": QUICK,
    "quiet": QUICK,
    "patient": QUICK,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of this module's own, whose config has one model per test. Its scheduler
    sweeps once an hour: the sweeps of this module are the tests' own."""
    models = {name: {**spec, "data_prefix": f"{name}/"} for name, spec in MODELS.items()}
    path = write_config(tmp_path_factory.mktemp("triggers"), models=models, sweep_seconds=3600)
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


@pytest.fixture(scope="module")
def db(stack: Stack) -> Database:
    """This module's stack's Firestore (the session's ``db`` is the session stack's)."""
    settings = stack.settings
    return Database(
        emulators.firestore_client(stack.firestore_host, settings.project, settings.database)
    )


@pytest.fixture(scope="module")
def ledger(db: Database) -> FirestoreLedger:
    return FirestoreLedger(db)


@pytest.fixture(scope="module")
def registry(stack: Stack, db: Database) -> FirestoreRegistry:
    gcs = emulators.storage_client(stack.gcs_url, stack.settings.project)
    return FirestoreRegistry(db, stack.settings.buckets.models, gcs)


def covered(records: list[RunRecord]) -> list[str]:
    return [event["dedupe_key"] for record in records for event in record.events]


def test_one_upload_gives_exactly_one_run(stack: Stack, gcs: Any, ledger: FirestoreLedger) -> None:
    uri = upload(gcs, stack, "single/rows.csv", RAINFALL)

    (run,) = settled(ledger, "single")

    assert run.state == "succeeded", run.error
    assert run.reason == "data"
    assert run.data_uris == [uri]
    (event,) = run.events
    generation = gcs.bucket(stack.settings.buckets.data).get_blob("single/rows.csv").generation
    assert event["dedupe_key"] == f"{stack.settings.buckets.data}/single/rows.csv#{generation}"


def test_the_same_notification_fifty_times_gives_one_run(
    stack: Stack, gcs: Any, ledger: FirestoreLedger, publisher: pubsub_v1.PublisherClient
) -> None:
    uri = upload(gcs, stack, "storm/rows.csv", RAINFALL)
    body, attributes = data_notification(uri, gcs)
    topic = publisher.topic_path(stack.settings.project, stack.settings.topics.data_arrivals)
    futures = [publisher.publish(topic, body, **attributes) for _ in range(50)]
    for future in futures:
        future.result(timeout=30)

    runs = settled(ledger, "storm")
    log = stack.logs / "on_data_arrival.log"
    assert wait_until(
        lambda: log.read_text(encoding="utf-8").count('"object": "' + uri) >= 51, timeout=60
    ), "every delivery must have been handled before we count runs"

    assert len(runs) == 1
    assert covered(runs) == [f"{stack.settings.buckets.data}/storm/rows.csv#"
                             f"{attributes['objectGeneration']}"]  # fmt: skip


def test_twenty_files_in_two_seconds_give_one_or_two_runs_covering_all(
    stack: Stack, gcs: Any, ledger: FirestoreLedger
) -> None:
    started = time.monotonic()
    uris = [
        upload(gcs, stack, f"burst/part-{i:02d}.csv", RAINFALL.iloc[i * 150 : (i + 1) * 150])
        for i in range(20)
    ]
    assert time.monotonic() - started < 2.5

    def all_covered() -> bool:
        keys = covered(ledger.runs("burst"))
        return len(keys) == 20

    assert wait_until(all_covered, timeout=120, interval=0.5)
    runs = settled(ledger, "burst")

    assert 1 <= len(runs) <= 2, [r.run_id for r in runs]
    assert all(r.state == "succeeded" for r in runs), [r.error for r in runs]
    assert sorted({k.split("#")[0] for k in covered(runs)}) == sorted(
        u.removeprefix("gs://") for u in uris
    )
    assert sorted(runs[-1].data_uris) == sorted(uris)  # the last run trains on every file


@pytest.fixture
def crashing_function(stack: Stack, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    (port,) = free_ports(1)
    marker = tmp_path / "crashed"
    argv = [
        sys.executable, "-m", "functions_framework", "--target", "on_data_arrival",
        "--source", str(ROOT / "tests" / "functions" / "crashing.py"),
        "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**stack.env(), "CRASH_MARKER": str(marker)}
    record = spawn(argv, tmp_path / "crashing.log", env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: http_ok(url + "/"), timeout=30, abort=lambda: not record.alive())
        yield url, marker
    finally:
        stop(record)


def test_function_killed_mid_request_is_redelivered_and_gives_one_run(
    stack: Stack,
    gcs: Any,
    ledger: FirestoreLedger,
    topic: str,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    crashing_function: tuple[str, Path],
) -> None:
    url, marker = crashing_function
    project = stack.settings.project
    # Only the crashing function hears this topic; the object is written where no
    # notification reaches the stack's own function (the run reads it by its prefix).
    subscription = subscriber.subscription_path(project, unique("crash"))
    subscriber.create_subscription(
        request={
            "name": subscription,
            "topic": publisher.topic_path(project, topic),
            "push_config": {"push_endpoint": f"{url}/projects/{project}/topics/{topic}"},
            "retry_policy": {"minimum_backoff": {"nanos": 200_000_000},
                             "maximum_backoff": {"seconds": 1}},
        }
    )  # fmt: skip
    uri = upload(gcs, stack, "crash/rows.csv", RAINFALL)
    # The stack's own function also heard the upload; let that run finish, then replay the
    # same object under a new key through the crashing function only.
    settled(ledger, "crash")
    body, attributes = data_notification(uri, gcs)
    attributes["retrain_dedupe_key"] = f"{uri}#crash-test"
    publisher.publish(publisher.topic_path(project, topic), body, **attributes).result(30)

    runs = settled(ledger, "crash", runs=2)

    assert marker.exists(), "the first delivery must have died mid-request"
    replayed = [r for r in runs if f"{uri}#crash-test" in covered([r])]
    assert len(replayed) == 1
    assert covered(runs).count(f"{uri}#crash-test") == 1
    assert replayed[0].state == "succeeded", replayed[0].error


def test_drift_raises_an_alert_and_an_unshifted_copy_does_not(
    stack: Stack,
    gcs: Any,
    ledger: FirestoreLedger,
    registry: FirestoreRegistry,
    subscriber: pubsub_v1.SubscriberClient,
) -> None:
    project = stack.settings.project
    alerts = subscriber.subscription_path(project, unique("alerts"))
    subscriber.create_subscription(
        name=alerts, topic=f"projects/{project}/topics/{stack.settings.topics.drift_alerts}"
    )

    def key_of(uri: str) -> str:
        blob = gcs.bucket(stack.settings.buckets.data).get_blob(uri.split("/", 3)[3])
        return f"{stack.settings.buckets.data}/{blob.name}#{blob.generation}"

    def outcome(uri: str) -> Any:
        arrival = ledger.arrival("drifty", key_of(uri))
        return arrival and arrival.get("outcome")

    try:
        initial = upload(gcs, stack, "drifty/rows-0-2999.csv", RAINFALL)
        (first,) = settled(ledger, "drifty")  # no champion yet: the first model is trained
        assert outcome(initial) == "first_model"
        # The stack's gatekeeper promoted it in the commit that ended the run, from its
        # copy in the registry bucket: the drift checks below compare with it.
        champion = registry.champion("drifty")
        assert champion is not None, registry.decisions("drifty")
        assert champion.run_id == first.run_id
        assert champion.artifact_uri.startswith(f"gs://{stack.settings.buckets.models}/")

        same = upload(gcs, stack, "drifty/copy.csv", RAINFALL.sample(frac=1.0, random_state=1))
        shifted = RAINFALL.copy()
        for column in ("dew point", "sea-level pressure"):
            shifted[column] += 2 * shifted[column].std()
        moved = upload(gcs, stack, "drifty/shifted.csv", shifted)

        assert wait_until(lambda: outcome(same) and outcome(moved), timeout=60, interval=0.5)
        assert outcome(same) == "no_drift"
        assert outcome(moved) == "drift"
        response = subscriber.pull(subscription=alerts, max_messages=10, timeout=30)
        (message,) = [m.message for m in response.received_messages]
        alert = decode(DriftAlert, message.data)
        assert alert.model == "drifty"
        assert alert.data_uris == [moved]
        drifted = alert.details["drift"]["drifted_features"]
        assert set(drifted[:2]) == {"dew point", "sea-level pressure"}
        # Keyed by the arrival: checking it again could not start a second run.
        assert message.attributes["retrain_dedupe_key"] == f"drift:{key_of(moved)}"
        runs = settled(ledger, "drifty", runs=2)
        assert runs[-1].reason == "drift"
        assert runs[-1].request_id == f"drift:{key_of(moved)}"
    finally:
        subscriber.delete_subscription(subscription=alerts)


def retrain_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args, "--config", str(stack.config_path)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip


def test_scheduled_and_manual_requests_each_start_a_run(
    stack: Stack, gcs: Any, ledger: FirestoreLedger, registry: FirestoreRegistry
) -> None:
    upload(gcs, stack, "sched/rows.csv", RAINFALL)
    settled(ledger, "sched")

    scheduled = retrain_cli(stack, "publish", "schedule", "--model", "sched")
    assert scheduled.returncode == 0, scheduled.stderr
    runs = settled(ledger, "sched", runs=2)
    assert runs[-1].reason == "schedule"
    assert runs[-1].state == "succeeded", runs[-1].error
    # On unchanged data it trains the same model again: a tie, which keeps the champion.
    kept = registry.decision("sched", runs[-1].run_id)
    assert kept is not None
    assert kept["decision"]["verdict"] == "rejected"
    assert "no improvement over v1: roc_auc +0.0000: FAIL" in kept["decision"]["reasons"]
    assert registry.pointer("sched").version == "1"

    manual = retrain_cli(stack, "publish", "manual", "--model", "sched", "--key", "ops-42")
    assert manual.returncode == 0, manual.stderr
    runs = settled(ledger, "sched", runs=3)
    assert runs[-1].reason == "manual"
    assert covered([runs[-1]]) == ["ops-42"]

    again = retrain_cli(stack, "publish", "manual", "--model", "sched", "--key", "ops-42")
    assert again.returncode == 0
    log = stack.logs / "on_schedule.log"
    assert wait_until(lambda: '"detail": "ops-42 already run"' in log.read_text("utf-8"), 30)
    assert len(settled(ledger, "sched", runs=3)) == 3

    listed = retrain_cli(stack, "runs", "sched")
    assert listed.returncode == 0
    assert [line.split()[2] for line in listed.stdout.splitlines()[1:]] == [
        "data", "schedule", "manual"
    ]  # fmt: skip


def test_republish_from_dead_letter_replays_end_to_end(
    stack: Stack, gcs: Any, ledger: FirestoreLedger, publisher: pubsub_v1.PublisherClient
) -> None:
    upload(gcs, stack, "dead/rows.csv", RAINFALL)
    settled(ledger, "dead")
    # A schedule message that no function could handle waits in the dead-letter topic.
    topic = stack.settings.topics.retrain_schedule
    dead_topic = publisher.topic_path(stack.settings.project, f"{topic}-dead-letter")
    publisher.publish(dead_topic, encode(ScheduleMessage(model="dead"))).result(timeout=30)

    replay = retrain_cli(stack, "republish", "--from-dead-letter", topic, "--limit", "5")

    assert replay.returncode == 0, replay.stderr
    assert "1 message(s) moved" in replay.stdout
    runs = settled(ledger, "dead", runs=2)
    assert runs[-1].reason == "schedule"
    assert runs[-1].state == "succeeded", runs[-1].error
    again = retrain_cli(stack, "republish", "--from-dead-letter", topic)
    assert "0 message(s) moved" in again.stdout  # it was acked once, after its publish


def sweep(stack: Stack, publisher: pubsub_v1.PublisherClient) -> None:
    """What Cloud Scheduler (locally, the scheduler) sends every ``sweep_seconds``."""
    topic = publisher.topic_path(stack.settings.project, stack.settings.topics.retrain_schedule)
    publisher.publish(topic, encode(ScheduleMessage(model="*", reason="sweep"))).result(30)


def sweep_outcomes(stack: Stack, model: str) -> list[str]:
    """What each sweep so far did with ``model``, from the on_schedule function's log."""
    found = []
    for line in (stack.logs / "on_schedule.log").read_text("utf-8").splitlines():
        detail = json.loads(line).get("detail", "") if line.startswith("{") else ""
        if detail.startswith("sweep: "):
            parts = detail.removeprefix("sweep: ").split("; ")
            found += [p.removeprefix(f"{model}: ") for p in parts if p.startswith(f"{model}: ")]
    return found


def test_a_sweep_runs_what_waits_behind_a_dead_run(
    stack: Stack, gcs: Any, ledger: FirestoreLedger, publisher: pubsub_v1.PublisherClient
) -> None:
    """A run that died before its worker started holds its model's lease until the lease
    expires, with the events it gathered; a quiet model gets no other event to notice.
    Before it expires the sweep leaves it be (it may be about to submit); after, with no
    pipeline of it running, the sweep takes the lease over and its events run again."""
    ttl = 15.0
    assert ledger.acquire("quiet", "quiet-died-gathering", ttl=ttl).acquired
    uri = upload(gcs, stack, "quiet/rows.csv", RAINFALL)
    assert wait_until(lambda: ledger.has_pending("quiet"), timeout=ttl / 2, interval=0.2), (
        "the upload must be queued behind the dead run"
    )
    lease = ledger.lease("quiet")
    assert lease is not None
    assert lease.run_id == "quiet-died-gathering"
    # It had even gathered the upload before it died: nothing is pending any more, and a
    # redelivery of the upload would be acked as covered.
    assert [r.data_uris for r in ledger.collect("quiet", "quiet-died-gathering")] == [[uri]]
    assert not ledger.has_pending("quiet")
    (dead,) = ledger.runs("quiet")
    key = covered([dead])
    assert len(key) == 1

    sweep(stack, publisher)
    assert wait_until(lambda: bool(sweep_outcomes(stack, "quiet")), timeout=30, interval=0.2)
    assert sweep_outcomes(stack, "quiet") == ["queued run quiet-died-gathering is in flight"]
    assert time.time() < lease.expires_at, "the sweep must have looked before the expiry"
    assert wait_until(lambda: time.time() > lease.expires_at, timeout=ttl + 5, interval=0.2)
    assert [r.run_id for r in ledger.runs("quiet")] == ["quiet-died-gathering"], "no event came"
    current = ledger.lease("quiet")
    assert current is not None
    assert current.run_id == "quiet-died-gathering"

    sweep(stack, publisher)

    dead, run = settled(ledger, "quiet", runs=2)
    assert dead.run_id == "quiet-died-gathering"
    assert dead.state == "abandoned"
    assert dead.error is not None
    assert "never started" in dead.error
    assert run.state == "succeeded", run.error
    assert run.data_uris == [uri]
    assert covered([run]) == key, "the dead run's event ran again, in the run that took over"
    assert sweep_outcomes(stack, "quiet")[1] == f"launched {run.run_id}"


def test_a_sweep_takes_no_lease_from_a_run_whose_worker_lives(
    stack: Stack, ledger: FirestoreLedger, publisher: pubsub_v1.PublisherClient
) -> None:
    """However long a run takes, its lease is not taken over while its pipeline runs: the
    sweep asks the launcher (locally: is the worker process the run recorded alive?) and
    extends the expired lease to ``lease_seconds``. Once the worker is dead, the next
    sweep takes the lease over: the run is abandoned, and the model is free again."""
    ttl = 5.0
    assert ledger.acquire("patient", "patient-slow", ttl=ttl).acquired
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        me = {"pid": worker.pid, "create_time": psutil.Process(worker.pid).create_time()}
        assert ledger.attach("patient", "patient-slow", ttl, {"worker": me}) == "held"
        lease = ledger.lease("patient")
        assert lease is not None
        assert wait_until(lambda: time.time() > lease.expires_at, timeout=ttl + 5, interval=0.2)

        sweep(stack, publisher)
        assert wait_until(lambda: bool(sweep_outcomes(stack, "patient")), timeout=30)

        assert sweep_outcomes(stack, "patient") == ["queued run patient-slow is in flight"]
        extended = ledger.lease("patient")
        assert extended is not None
        assert extended.run_id == "patient-slow"
        lease_seconds = stack.settings.models["patient"].lease_seconds
        assert extended.expires_at > time.time() + lease_seconds - 60, "extended by the sweep"
        assert [r.run_id for r in ledger.runs("patient")] == ["patient-slow"]
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait()

    sweep(stack, publisher)

    slow, after = settled(ledger, "patient", runs=2)
    assert slow.run_id == "patient-slow"
    assert slow.state == "abandoned"
    assert slow.error is not None
    assert "its pipeline ended without a report" in slow.error
    assert sweep_outcomes(stack, "patient")[1] == f"launched {after.run_id}"
    assert after.events == [], "nothing waited"
    assert after.state == "abandoned"
