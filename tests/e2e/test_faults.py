"""No event lost, none run twice, while parts of the stack die: data lands while the Pub/Sub
emulator is down (its notification is lost), a pipeline worker is killed mid-run, a
function is killed as data lands. Each object's event ends up covered by one decided run."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.statedb import Database
from tests.conftest import QUICK_MODEL, rainfall, settled, write_config
from tests.e2e.test_healing import RECOVERY_DEADLINE, healed, server_of

pytestmark = pytest.mark.e2e

MODEL = "kept"
RAINFALL = rainfall(6000)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    models = {MODEL: {**QUICK_MODEL, "data_prefix": f"{MODEL}/"}}
    path = write_config(tmp_path_factory.mktemp("faults"), models=models, sweep_seconds=5)
    with Stack(load_settings(path), path).running_stack(supervise=True) as started:
        yield started


def kill(stack: Stack, part: str) -> int:
    server = server_of(stack, part)
    recorded = stack.records()[part].pid
    server.send_signal(signal.SIGKILL)
    return recorded


def test_no_event_is_lost_or_run_twice_while_parts_die(stack: Stack, record_property: Any) -> None:
    settings = stack.settings
    gcs = emulators.storage_client(stack.gcs_url, settings.project)
    db = Database(emulators.firestore_client(stack.firestore_host, settings.project,
                                             settings.database))  # fmt: skip
    ledger, registry = FirestoreLedger(db), FirestoreRegistry(db, settings.buckets.models, gcs)
    bucket = gcs.bucket(settings.buckets.data)
    uploaded: list[Any] = []

    def land(i: int) -> None:
        blob = bucket.blob(f"{MODEL}/chunk-{i}.csv")
        blob.upload_from_string(RAINFALL.iloc[1500 * i : 1500 * i + 3000].to_csv(index=False))
        blob.reload()
        uploaded.append(blob)

    land(0)
    settled(ledger, MODEL, runs=1)

    # 1. Data lands while the Pub/Sub emulator is down: fake-gcs-server's publish is retried
    #    until the restarted emulator takes it, or it is lost and the sweep finds the object.
    pubsub = kill(stack, "pubsub")
    land(1)
    landed = time.time()
    assert wait_until(lambda: healed(stack, "pubsub", pubsub), timeout=RECOVERY_DEADLINE)
    settled(ledger, MODEL, runs=2)
    key = f"{bucket.name}/{uploaded[1].name}#{uploaded[1].generation}"
    recovered = ledger.arrival(MODEL, key)
    assert recovered is not None
    by_sweep = recovered["request"]["trigger_event_id"] == f"sweep:{key}"
    record_property("arrival_during_pubsub_outage_by", "sweep" if by_sweep else "notification")
    record_property("arrival_during_pubsub_outage_after_s",
                    round(recovered["received_at"] - landed))  # fmt: skip

    # 2. A pipeline worker is killed mid-run: the sweep finds it dead by its pid, stops its
    #    tasks, and a new run covers its events.
    land(2)

    def running_worker() -> int | None:
        for run in ledger.runs(MODEL):
            if run.state == "running" and run.worker:
                return int(run.worker["pid"])
        return None

    assert wait_until(lambda: running_worker() is not None, timeout=120, interval=0.1)
    worker = running_worker()
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    killed_at = time.time()
    settled(ledger, MODEL, runs=4, timeout=240)
    abandoned = next(run for run in ledger.runs(MODEL) if run.state == "abandoned")
    assert abandoned.ended_at is not None
    record_property("dead_worker_taken_over_after_s", round(abandoned.ended_at - killed_at, 1))

    # 3. The function is killed as data lands: Pub/Sub redelivers to the restarted function
    #    (or, past its attempts, the sweep finds the object).
    function = kill(stack, "on_data_arrival")
    land(3)
    assert wait_until(lambda: healed(stack, "on_data_arrival", function),
                      timeout=RECOVERY_DEADLINE)  # fmt: skip
    # Wait for the object's event itself, not for a count of runs: on a busy machine the
    # worker's takeover may have made the fifth run before this object's redelivery (or the
    # sweep) records it, and `settled` then saw nothing pending yet.
    last = f"{bucket.name}/{uploaded[3].name}#{uploaded[3].generation}"
    assert wait_until(lambda: ledger.event(MODEL, last) is not None, timeout=240), (
        f"{uploaded[3].name}: its event was lost"
    )
    runs = settled(ledger, MODEL, runs=5, timeout=240)

    decided: dict[str, str] = {}  # event -> the decided run that covers it
    for blob in uploaded:
        key = f"{bucket.name}/{blob.name}#{blob.generation}"
        event = ledger.event(MODEL, key)
        assert event is not None, f"{blob.name}: its event was lost"
        covering = event["run_id"]
        assert registry.decision(MODEL, covering) is not None, f"{blob.name}: run not decided"
        decided[key] = covering
    for run in runs:
        keys = {e["dedupe_key"] for e in run.events}
        if registry.decision(MODEL, run.run_id) is not None:
            assert all(decided.get(k, run.run_id) == run.run_id for k in keys), (
                f"{run.run_id} decided events that another decided run covers"
            )
        else:
            assert run.state == "abandoned", run
    states = sorted(run.state for run in runs)
    assert states.count("abandoned") == 1, states  # the killed worker's run
