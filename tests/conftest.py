"""Shared fixtures: a real local stack started once per session, and uuid-named resources."""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from retrain.config import Settings, load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger, RunRecord
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import (
    ProcessRecord,
    http_ok,
    port_in_use,
    spawn,
    stop,
    wait_until,
)
from retrain.statedb import Database

ROOT = Path(__file__).resolve().parents[1]
RECORDER = ROOT / "tests" / "functions" / "recorder.py"


def _one_openmp_thread_in_children() -> None:
    """Every process the suite starts (stacks, pipeline runs, CLIs) uses one OpenMP thread.

    The suite runs many processes side by side on few cores; an OpenMP team per process spins
    while it waits for cores the others hold: a HistGradientBoosting fit of a test run took
    10-14 s so instead of 0.6 s on a busy 2-core machine. This process keeps OpenMP's default:
    libgomp reads the variable once, when it loads, and it is loaded here first, so that the
    tests of the product's own thread limits (the prediction servers') still fail without
    them. A value set by the caller is kept."""
    from sklearn.utils import _openmp_helpers  # noqa: F401, PLC0415 (loads libgomp)

    os.environ.setdefault("OMP_NUM_THREADS", "1")


_one_openmp_thread_in_children()


# Ports for the tests' servers, from a range of this xdist worker's own, below the kernel's
# ephemeral range and below what retrain's own free_ports picks (`retrain demo`), so that
# no other worker's stack, nor any client socket, can take a port between the moment it is
# chosen and the moment a slow JVM binds it. Each session starts at a random place in its
# range, so that two test sessions on one machine (two checkouts) rarely meet.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORTS_PER_WORKER = 2500
_FIRST_PORT = 10000 + _PORTS_PER_WORKER * _WORKER
_START = random.randrange(_PORTS_PER_WORKER)  # noqa: S311 (a spread, not a secret)
_NEXT_PORT = (_FIRST_PORT + (_START + i) % _PORTS_PER_WORKER for i in itertools.count())
_HANDED_OUT = itertools.count()


# The files that take longest, longest first: `make test` hands whole files to its workers
# (--dist loadfile) in collection order (--no-loadscope-reorder, in pyproject.toml), and a
# long file handed out last keeps one worker busy while the other has nothing left to do.
# The order of a 2-worker run (seconds there: 600, 530, 350, 350, 180, ...); the other files
# follow in their own order. Within a file, tests keep theirs.
SLOWEST_FILES = (
    "tests/e2e/test_monitor.py",
    "tests/reliability/test_canary.py",
    "tests/integration/test_triggers.py",
    "tests/integration/test_pipeline_run.py",
    "tests/e2e/test_gatekeeper.py",
    "tests/e2e/test_bad_data.py",
    "tests/e2e/test_stack_cli.py",
    "tests/e2e/test_faults.py",
    "tests/reliability/test_arrivals.py",
    "tests/reliability/test_crash_points.py",
    "tests/e2e/test_healing.py",
    "tests/e2e/test_demo.py",
    "tests/e2e/test_dashboard.py",
    "tests/e2e/test_canary.py",
    "tests/reliability/test_races.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def free_ports(count: int) -> list[int]:
    """``count`` ports free now, never handed out before in this session."""
    found: list[int] = []
    for port in _NEXT_PORT:
        if next(_HANDED_OUT) >= _PORTS_PER_WORKER:
            raise RuntimeError(f"xdist worker {_WORKER} used its {_PORTS_PER_WORKER} ports")
        if not port_in_use("127.0.0.1", port):
            found.append(port)
        if len(found) == count:
            return found
    raise AssertionError("unreachable")


def write_config(directory: Path, **overrides: Any) -> Path:
    """The shipped retrain.yaml with free ports and its state folder under ``directory``."""
    raw = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    names = list(raw["local"]["ports"])
    raw["local"]["ports"] = dict(zip(names, free_ports(len(names)), strict=True))
    raw["local"]["state_dir"] = str(directory / "state")
    raw["project"] = "retrain-test"
    raw.update(overrides)
    path = directory / "retrain.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real local stack, once per session; or a running one named by $RETRAIN_TEST_CONFIG."""
    given = os.environ.get("RETRAIN_TEST_CONFIG")
    if given:
        path = Path(given)
        running = Stack(load_settings(path), path)
        if not running.status() or not all(p.healthy for p in running.status()):
            pytest.fail(f"RETRAIN_TEST_CONFIG={given} names no healthy running stack")
        yield running
        return
    path = write_config(tmp_path_factory.mktemp("stack"))
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


@pytest.fixture(scope="session")
def settings(stack: Stack) -> Settings:
    return stack.settings


@pytest.fixture
def publisher(stack: Stack) -> Iterator[Any]:
    client = emulators.publisher(stack.pubsub_host)
    yield client
    client.transport.close()


@pytest.fixture
def subscriber(stack: Stack) -> Iterator[Any]:
    client = emulators.subscriber(stack.pubsub_host)
    yield client
    client.close()


@pytest.fixture
def gcs(stack: Stack) -> Any:
    return emulators.storage_client(stack.gcs_url, stack.settings.project)


@pytest.fixture(scope="session")
def db(stack: Stack) -> Database:
    """The stack's Firestore database (the ledger's and the registry's)."""
    settings = stack.settings
    return Database(
        emulators.firestore_client(stack.firestore_host, settings.project, settings.database)
    )


@pytest.fixture
def ledger(db: Database) -> FirestoreLedger:
    return FirestoreLedger(db)


@pytest.fixture
def registry(stack: Stack, db: Database, gcs: Any) -> FirestoreRegistry:
    return FirestoreRegistry(db, stack.settings.buckets.models, gcs)


@pytest.fixture
def topic(stack: Stack, publisher: Any, subscriber: Any) -> Iterator[str]:
    """A uuid-named topic, deleted after the test with its subscriptions."""
    name = unique("t")
    path = publisher.topic_path(stack.settings.project, name)
    publisher.create_topic(name=path)
    yield name
    for sub in publisher.list_topic_subscriptions(topic=path):
        subscriber.delete_subscription(subscription=sub)
    publisher.delete_topic(topic=path)


@pytest.fixture
def bucket(gcs: Any) -> Iterator[Any]:
    """A uuid-named bucket, emptied and deleted after the test."""
    created = gcs.create_bucket(unique("b"))
    yield created
    for blob in gcs.list_blobs(created):
        blob.delete()
    created.delete()


@dataclass
class Recorder:
    """A functions-framework process whose function writes every delivery to ``file``."""

    url: str
    file: Path

    def events(self) -> list[dict[str, Any]]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def recorder(stack: Stack, tmp_path: Path) -> Iterator[Callable[[str], Recorder]]:
    """Start recorder functions (``record`` or ``fail``); each is stopped by its pid."""
    started: list[ProcessRecord] = []

    def start(target: str) -> Recorder:
        (port,) = free_ports(1)
        file = tmp_path / f"{target}-{port}.jsonl"
        argv = [
            sys.executable,
            "-m",
            "functions_framework",
            "--target",
            target,
            "--source",
            str(RECORDER),
            "--signature-type",
            "cloudevent",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        record = spawn(
            argv, tmp_path / f"{target}-{port}.log", {"RECORDER_FILE": str(file)}, tmp_path
        )
        started.append(record)
        url = f"http://127.0.0.1:{port}"
        assert wait_until(
            lambda: http_ok(url + "/"), timeout=30, abort=lambda: not record.alive()
        ), f"recorder {target} did not start; see {tmp_path}"
        return Recorder(url, file)

    yield start
    for record in started:
        stop(record)


# -- shared by the tests that drive whole runs ---------------------------------------------

SHIPPED_MODEL: dict[str, Any] = yaml.safe_load((ROOT / "retrain.yaml").read_text("utf-8"))[
    "models"
]["rainfall"]
# The shipped rainfall model, made quick: a small estimator, a run per arrival, a short
# coalescing window, no schedule.
QUICK_MODEL: dict[str, Any] = {
    **SHIPPED_MODEL,
    "estimator": {"name": "HistGradientBoostingClassifier", "params": {"max_iter": 30}},
    "arrival_policy": "every_arrival",
    "coalesce_seconds": 0.5,
    "schedule": None,
}


def rainfall(rows: int) -> Any:
    """The first ``rows`` of the rainfall stream, with its order column named ``day``."""
    import pandas as pd  # noqa: PLC0415 (only the run-driving tests need pandas)

    frame = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=rows)
    return frame.rename(columns={"Unnamed: 0": "day"})


def upload(gcs: Any, stack: Stack, name: str, frame: Any) -> str:
    """Write ``frame`` as CSV to the data bucket (which notifies); return its gs:// URI."""
    bucket = stack.settings.buckets.data
    gcs.bucket(bucket).blob(name).upload_from_string(frame.to_csv(index=False))
    return f"gs://{bucket}/{name}"


def settled(
    ledger: FirestoreLedger, model: str, runs: int = 1, timeout: float = 180
) -> list[RunRecord]:
    """Wait until ``model`` has at least ``runs`` runs, all ended, no lease, nothing pending."""

    def done() -> bool:
        records = ledger.runs(model)
        return (
            len(records) >= runs
            and all(r.ended_at is not None for r in records)
            and ledger.lease(model) is None
            and not ledger.has_pending(model)
        )

    assert wait_until(done, timeout=timeout, interval=0.5), (
        f"{model} did not settle: {ledger.runs(model)}, lease {ledger.lease(model)}"
    )
    return ledger.runs(model)
