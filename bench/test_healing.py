"""How fast the local stack heals: each part killed with ``kill -9`` several times, the time
until ``Stack.status()`` is healthy again, and what a kill loses (docs/reliability.md,
"Broken parts: the local stack heals")."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from retrain.config import load_settings
from retrain.localstack import PART_NAMES, Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.statedb import Database
from retrain.topology import topology
from tests.conftest import unique, write_config
from tests.e2e.test_healing import RECOVERY_DEADLINE, exported_after, healed, server_of

pytestmark = pytest.mark.bench

KILLS = 3
APART = 65.0  # seconds between two kills of one part: its backoff is back at 1 s


@pytest.fixture(scope="module")
def healing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    path = write_config(tmp_path_factory.mktemp("healing"))
    with Stack(load_settings(path), path).running_stack(supervise=True) as started:
        yield started


def kill_and_wait(stack: Stack, name: str) -> float:
    """kill -9 the process of ``name`` that serves its port; seconds until all is healthy."""
    server = server_of(stack, name)
    recorded = stack.records()[name].pid
    started = time.monotonic()
    server.kill()
    assert wait_until(lambda: healed(stack, name, recorded), RECOVERY_DEADLINE, interval=0.1)
    return time.monotonic() - started


@pytest.mark.timeout(1800)
def test_recovery_time_of_each_part(healing: Stack) -> None:
    took: dict[str, list[float]] = {name: [] for name in PART_NAMES}
    killed_at: dict[str, float] = {}
    for _ in range(KILLS):
        for name in PART_NAMES:
            wait_until(lambda name=name: time.monotonic() - killed_at.get(name, 0) > APART,  # type: ignore[misc]
                       timeout=APART + 1, interval=0.5)  # fmt: skip
            killed_at[name] = time.monotonic()
            took[name].append(kill_and_wait(healing, name))
    print(f"\n{'part':<16} kills  recovery s (min / median / max)")
    for name, times in took.items():
        print(f"{name:<16} {len(times):>5}  {min(times):.1f} / {statistics.median(times):.1f} / "
              f"{max(times):.1f}")  # fmt: skip


def test_what_a_kill_loses(healing: Stack) -> None:
    stack, settings = healing, healing.settings
    db = Database(emulators.firestore_client(stack.firestore_host, settings.project,
                                             settings.database))  # fmt: skip

    # Firestore: an export of a thousand documents, timed.
    batch: Any = db.client.batch()
    for n in range(1000):
        batch.set(db.doc("bench-docs", f"d{n}"), {"n": n, "text": "x" * 200})
        if n % 400 == 399:
            batch.commit()
            batch = db.client.batch()
    batch.commit()
    exports = []
    for _ in range(5):
        started = time.monotonic()
        assert healing.export_firestore() is not None
        exports.append(time.monotonic() - started)
    print(f"\nFirestore export of 1,000 documents: {min(exports):.2f}-{max(exports):.2f} s")

    # Firestore: what was exported is kept; what was written since is lost.
    kept, lost = unique("kept"), unique("lost")
    db.doc("healing", kept).set({"at": time.time()})
    written = time.time()
    assert wait_until(lambda: exported_after(stack, written), timeout=60, interval=0.2)
    db.doc("healing", lost).set({"at": time.time()})
    kill_and_wait(stack, "firestore")
    assert db.read_path("healing", kept).exists
    assert not db.read_path("healing", lost).exists
    print("Firestore kill -9: a write exported before it kept, a write after the export lost")

    # Pub/Sub: a message that waits in a subscription is lost with the emulator.
    plan = topology(settings)
    sub, topic = next(iter(plan.pulls.items()))
    publisher = emulators.publisher(stack.pubsub_host)
    subscriber = emulators.subscriber(stack.pubsub_host)
    try:
        publisher.publish(f"projects/{settings.project}/topics/{topic}", b"waiting").result(30)
        kill_and_wait(stack, "pubsub")
        pulled = subscriber.pull(
            subscription=f"projects/{settings.project}/subscriptions/{sub}",
            max_messages=10,
            timeout=10,
        )
        assert not pulled.received_messages
        print(f"Pub/Sub kill -9: the message waiting in {sub} is gone after the restart")
    finally:
        subscriber.close()
        publisher.transport.close()


def test_a_push_that_fails_while_its_function_is_down_is_delivered_after(healing: Stack) -> None:
    """Pub/Sub retries a push that fails (1-10 s apart, 5 attempts): one published while the
    gatekeeper is down reaches the restarted gatekeeper. (A report that is not one: the
    gatekeeper logs its event id and leaves it to the dead-letter topic.)"""
    stack, settings = healing, healing.settings
    server = server_of(stack, "gatekeeper")
    recorded = stack.records()["gatekeeper"].pid
    publisher = emulators.publisher(stack.pubsub_host)
    try:
        server.kill()
        topic = f"projects/{settings.project}/topics/{settings.topics.model_metrics}"
        message_id = publisher.publish(topic, b"not a report").result(30)
    finally:
        publisher.transport.close()
    assert wait_until(lambda: healed(stack, "gatekeeper", recorded), RECOVERY_DEADLINE)
    log = stack.logs / "gatekeeper.log"
    assert wait_until(lambda: message_id in log.read_text(encoding="utf-8"), timeout=60)
    print("\na push published while the gatekeeper was down reached the restarted gatekeeper")
