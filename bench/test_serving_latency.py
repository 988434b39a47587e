"""The prediction service on the local stack: latency, throughput, and a swap under load.

Run with ``make bench``. Prints the figures; asserts only correctness (no failed request).
"""

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from retrain import blobstore
from retrain.bus import PubsubBus
from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.messages import Decision
from retrain.statedb import Database
from serving.models import load_model
from tests.conftest import ROOT, write_config

pytestmark = pytest.mark.bench

MODEL = "bench"
ROWS = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=3000).rename(
    columns={"Unnamed: 0": "day"}
)
FEATURES = [c for c in ROWS.columns if c not in ("day", "rain")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))["models"]
    spec = {**base["rainfall"], "data_prefix": f"{MODEL}/", "arrival_policy": "every_arrival",
            "coalesce_seconds": 0.5, "schedule": None}  # fmt: skip
    path = write_config(tmp_path_factory.mktemp("serving-bench"), models={MODEL: spec})
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


def _path(stack: Stack) -> str:
    s = stack.settings
    return f"/v1/projects/{s.project}/locations/{s.region}/endpoints/{MODEL}:predict"


def _load(stack: Stack, body: bytes, concurrency: int, total: int) -> tuple[list[float], float]:
    """``total`` requests over ``concurrency`` keep-alive connections; latencies in ms."""
    host, port = stack.settings.local.host, stack.settings.local.ports.serving
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        mine = []
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", _path(stack), body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                failures.append(str(response.status))
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(total // concurrency,))
               for _ in range(concurrency)]  # fmt: skip
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.perf_counter() - started
    assert failures == []
    return latencies, elapsed


def _served(stack: Stack, body: bytes) -> bool:
    connection = http.client.HTTPConnection(
        stack.settings.local.host, stack.settings.local.ports.serving, timeout=10
    )
    connection.request("POST", _path(stack), body, {"Content-Type": "application/json"})
    ok = connection.getresponse().status == 200
    connection.close()
    return ok


def test_serving_latency_throughput_and_swap(  # noqa: PLR0915 (one scenario, told in order)
    stack: Stack, tmp_path: Path
) -> None:
    gcs = emulators.storage_client(stack.gcs_url, stack.settings.project)
    gcs.bucket(stack.settings.buckets.data).blob(f"{MODEL}/rows.csv").upload_from_string(
        ROWS.to_csv(index=False)
    )
    settings = stack.settings
    db = Database(emulators.firestore_client(stack.firestore_host, settings.project,
                                             settings.database))  # fmt: skip
    ledger = FirestoreLedger(db)
    registry = FirestoreRegistry(db, settings.buckets.models, gcs)
    assert wait_until(lambda: registry.champion(MODEL) is not None, timeout=120, interval=0.5)
    assert wait_until(lambda: ledger.lease(MODEL) is None, timeout=60, interval=0.5)
    champion = registry.champion(MODEL)
    assert champion is not None
    one = json.dumps({"instances": [ROWS[FEATURES].iloc[0].tolist()]}).encode()
    thousand = json.dumps({"instances": ROWS[FEATURES].iloc[:1000].to_numpy().tolist()}).encode()
    assert wait_until(lambda: _served(stack, one), timeout=30, interval=0.2)

    # The floor: the same model's predict, in this process.
    with pytest.MonkeyPatch.context() as env:
        for name, value in stack.env().items():
            env.setenv(name, value)
        blobstore.download_dir(champion.artifact_uri, tmp_path / "model")
    model = load_model(champion, tmp_path / "model")
    x1 = model.matrix([ROWS[FEATURES].iloc[0].tolist()])
    floor = []
    for _ in range(2000):
        started = time.perf_counter()
        model.predict(x1)
        floor.append((time.perf_counter() - started) * 1000)

    figures = {}
    for concurrency, total in ((1, 2000), (8, 4000), (32, 4000)):
        latencies, elapsed = _load(stack, one, concurrency, total)
        figures[concurrency] = (np.percentile(latencies, 50), np.percentile(latencies, 99),
                                len(latencies) / elapsed)  # fmt: skip
    big, big_elapsed = _load(stack, thousand, 4, 200)
    rows_per_second = 1000 * len(big) / big_elapsed

    # A promotion under load: move the champion, publish the Decision, as the gatekeeper does.
    version = registry.register(
        MODEL, {"model": MODEL, "artifact_uri": champion.artifact_uri, "metrics": {},
                "run_id": f"bench-copy-{time.time_ns()}"},
    )  # fmt: skip
    seen: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        host, port = stack.settings.local.host, stack.settings.local.ports.serving
        connection = http.client.HTTPConnection(host, port, timeout=10)
        while not stop.is_set():
            connection.request("POST", _path(stack), one, {"Content-Type": "application/json"})
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                errors.append(body.decode())
                continue
            seen.append((time.perf_counter(), json.loads(body)["modelVersionId"]))
        connection.close()

    watchers = [threading.Thread(target=watch) for _ in range(8)]
    for thread in watchers:
        thread.start()
    time.sleep(0.5)  # load is flowing before the swap (the thing measured is the swap)
    decided = time.perf_counter()
    generation = registry.pointer(MODEL).generation
    assert registry.promote(MODEL, version, generation, by="bench", reason="swap under load")
    with pytest.MonkeyPatch.context() as env:
        for name, value in stack.env().items():
            env.setenv(name, value)
        PubsubBus(stack.settings.project).publish(
            stack.settings.topics.model_decisions,
            Decision(model=MODEL, run_id="bench", verdict="promoted", reasons=["bench: pass"],
                     new_version=version, previous_champion=champion.version),
        )  # fmt: skip
    assert wait_until(lambda: any(v == version for _, v in seen), timeout=30, interval=0.01)
    stop.set()
    for thread in watchers:
        thread.join(timeout=30)
    visible = min(t for t, v in seen if v == version) - decided

    print()
    print(
        f"in-process predict, 1 row (the floor): p50 {np.percentile(floor, 50):.3f} ms, "
        f"p99 {np.percentile(floor, 99):.3f} ms"
    )
    for concurrency, (p50, p99, rate) in figures.items():
        print(
            f"HTTP 1-row, concurrency {concurrency:>2}: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
            f"{rate:7.0f} requests/s"
        )
    print(f"HTTP 1,000-row requests, concurrency 4: {rows_per_second:,.0f} rows/s")
    print(
        f"promotion visible to clients {visible * 1000:.0f} ms after the decision; "
        f"{len(errors)} failed of {len(seen) + len(errors)} requests during the swap"
    )
    assert errors == []
