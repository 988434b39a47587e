"""The local stack heals itself: a part killed with ``kill -9`` is restarted by the
supervisor, provisioned again, and counted; ``retrain restart`` and ``status`` show it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from google.api_core.exceptions import GoogleAPICallError, RetryError

from retrain.config import load_settings
from retrain.localstack import PART_NAMES, Stack, emulators
from retrain.localstack.processes import ProcessRecord, wait_until
from retrain.statedb import Database
from retrain.topology import topology
from tests.conftest import unique, write_config

pytestmark = pytest.mark.e2e

# kill -9 to healthy again took at most 7 s here on a quiet machine (docs/reliability.md);
# a busy one makes a JVM take more than 30 s to answer.
RECOVERY_DEADLINE = 120.0


@pytest.fixture(scope="module")
def healing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own, supervised (the session stack is not), thrown away after."""
    path = write_config(tmp_path_factory.mktemp("healing"))
    with Stack(load_settings(path), path).running_stack(supervise=True) as started:
        yield started


def server_of(stack: Stack, name: str) -> psutil.Process:
    """The process of part ``name`` that listens on its port: the JVM of an emulator (the
    Firestore emulator's launcher script is its parent), else the recorded process."""
    record = stack.records()[name].with_children()
    port = stack.part(name).port
    for pid, started in ((record.pid, record.create_time), *record.children):
        if not ProcessRecord(pid, started).alive():
            continue
        proc = psutil.Process(pid)
        if any(c.laddr.port == port for c in proc.net_connections("tcp") if c.status == "LISTEN"):
            return proc
    raise AssertionError(f"no recorded process of {name} listens on {port}")


def healed(stack: Stack, name: str, killed: int) -> bool:
    """Every part healthy, and ``name`` runs as a new process, its restart counted; a
    restarted Pub/Sub emulator has its subscriptions again."""
    parts = {part.name: part for part in stack.status()}
    return (
        all(part.healthy for part in parts.values())
        and parts[name].pid != killed
        and parts[name].restarts >= 1
        and (name != "pubsub" or subscribed(stack))
    )


def subscribed(stack: Stack) -> bool:
    """Whether every push and pull subscription of the topology exists."""
    plan = topology(stack.settings)
    wanted = {route.subscription for route in plan.pushes} | set(plan.pulls)
    subscriber = emulators.subscriber(stack.pubsub_host)
    try:
        project = f"projects/{stack.settings.project}"
        names = {s.name.rsplit("/", 1)[-1] for s in subscriber.list_subscriptions(project=project)}
    except (GoogleAPICallError, RetryError):
        return False
    finally:
        subscriber.close()
    return wanted <= names


def exported_after(stack: Stack, written: float) -> bool:
    """Whether the supervisor finished a Firestore export after ``written`` (a time)."""
    exports = (stack.state_dir / "firestore").glob("*/*metadata")
    return any(p.stat().st_mtime > written + 0.5 for p in exports)


def test_every_part_killed_with_kill_9_comes_back(healing: Stack) -> None:
    stack, settings = healing, healing.settings
    gcs = emulators.storage_client(stack.gcs_url, settings.project)
    kept_object = gcs.bucket(settings.buckets.models).blob(unique("kept"))
    kept_object.upload_from_string(b"on disk")
    db = Database(emulators.firestore_client(stack.firestore_host, settings.project,
                                             settings.database))  # fmt: skip
    doc = unique("doc")
    db.doc("healing", doc).set({"kept": True})
    written = time.time()
    # The supervisor exports every 10 s: wait for one that has the document.
    assert wait_until(lambda: exported_after(stack, written), timeout=60, interval=0.5), (
        "the supervisor exported nothing"
    )

    for name in PART_NAMES:
        server = server_of(stack, name)
        recorded = stack.records()[name].pid
        server.send_signal(signal.SIGKILL)
        assert wait_until(
            lambda name=name, recorded=recorded: healed(stack, name, recorded),  # type: ignore[misc]
            timeout=RECOVERY_DEADLINE,
            interval=0.2,
        ), f"{name} did not come back: {stack.status()}; see {stack.logs}"
    assert {part.name: part.restarts for part in stack.status()} == dict.fromkeys(PART_NAMES, 1)
    # The restarted Firestore emulator's JVM (a child of its launcher script) is recorded:
    # a kill -9 of the script alone would leave it holding the port otherwise.
    assert wait_until(lambda: bool(stack.records()["firestore"].children), timeout=30)

    # What each restart had to bring back: Pub/Sub's subscriptions (checked by healed), the
    # objects that fake-gcs-server keeps on disk, and the Firestore export.
    assert kept_object.download_as_bytes() == b"on disk"
    assert db.read_path("healing", doc).data == {"kept": True}


def test_restart_command_and_status_column(healing: Stack) -> None:
    before = {part.name: part for part in healing.status()}["serving"]
    restarted = retrain("restart", "serving", config=healing.config_path)
    assert restarted.returncode == 0, restarted.stderr
    after = {part.name: part for part in healing.status()}["serving"]
    assert after.pid != before.pid
    assert after.healthy
    assert after.restarts == before.restarts + 1

    status = retrain("status", config=healing.config_path)
    assert status.returncode == 0, status.stdout
    assert "restarts" in status.stdout
    row = next(line for line in status.stdout.splitlines() if line.startswith("serving"))
    assert f"healthy  {after.restarts} (last " in row
    assert "supervisor: running" in status.stdout

    unknown = retrain("restart", "postgres", config=healing.config_path)
    assert unknown.returncode == 2
    assert "no part 'postgres'" in unknown.stderr
    assert "pubsub, firestore, gcs" in unknown.stderr


def retrain(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={"COLUMNS": "200", "PATH": os.environ["PATH"]},
    )


def test_down_exports_from_a_firestore_the_supervisor_restarted(healing: Stack) -> None:
    """The parts the supervisor restarted are its children: stopping it first (as down does)
    must not stop them, or a restarted Firestore emulator is gone before down exports it.
    Last in this module: it stops the stack."""
    assert {part.name: part.restarts for part in healing.status()}["firestore"] >= 1
    exports = healing.state_dir / "firestore"
    before = {p.name for p in exports.iterdir()}

    stopped = healing.down()  # exports, as `retrain down` does

    made = [p for p in exports.iterdir() if p.name not in before]
    assert [p for p in made if list(p.glob("*metadata"))], "down exported nothing"
    assert stopped[0] == "supervisor"
    assert set(stopped) == {"supervisor", *PART_NAMES}
