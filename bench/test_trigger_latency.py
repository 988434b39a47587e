"""Triggers on the running local stack: upload -> handled latency, and a duplicate storm.

Run with ``make bench``. Prints the figures; asserts only correctness (one run), not speed.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from retrain.config import load_settings
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.operator import data_notification
from retrain.statedb import Database
from tests.conftest import ROOT, write_config

pytestmark = pytest.mark.bench

UPLOADS = 200
DUPLICATES = 1000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))["models"]
    quick = {
        **base["rainfall"],
        "arrival_policy": "every_arrival",
        "estimator": {"name": "HistGradientBoostingClassifier", "params": {"max_iter": 30}},
        "coalesce_seconds": 1.0,
        "schedule": None,
    }
    names = ("latency", "quiet", "storm")
    models = {name: {**quick, "data_prefix": f"{name}/"} for name in names}
    path = write_config(tmp_path_factory.mktemp("bench"), models=models)
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


def _handled(stack: Stack) -> dict[str, dict[str, Any]]:
    """The function's log lines by object URI (the last line per object)."""
    lines = (stack.logs / "on_data_arrival.log").read_text(encoding="utf-8").splitlines()
    handled: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line.startswith("{") and '"object"' in line:
            entry = json.loads(line)
            handled.setdefault(entry["object"], entry)
    return handled


def _percentiles(values: list[float]) -> str:
    array = np.asarray(values)
    return (f"p50 {np.percentile(array, 50):7.1f} ms   p99 {np.percentile(array, 99):7.1f} ms"
            f"   max {array.max():7.1f} ms")  # fmt: skip


def _stream(stack: Stack, bucket: Any, model: str, first: str) -> dict[str, float]:
    """Upload UPLOADS objects for ``model``, one every ~20 ms; when each was uploaded."""
    uploaded: dict[str, float] = {}
    for i in range(UPLOADS):
        name = f"{model}/part-{i:03d}.csv"
        bucket.blob(name).upload_from_string(first if i == 0 else "day,rain\n")
        uploaded[f"gs://{bucket.name}/{name}"] = time.time()
        time.sleep(0.02)  # a steady stream, not a burst: ~40 uploads a second
    assert wait_until(lambda: set(uploaded) <= set(_handled(stack)), timeout=120)
    return uploaded


def test_upload_to_handled_latency_and_duplicate_storm(stack: Stack) -> None:
    gcs = emulators.storage_client(stack.gcs_url, stack.settings.project)
    bucket = gcs.bucket(stack.settings.buckets.data)
    rows = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=3000)
    csv = rows.rename(columns={"Unnamed: 0": "day"}).to_csv(index=False)
    settings = stack.settings
    ledger = FirestoreLedger(Database(emulators.firestore_client(
        stack.firestore_host, settings.project, settings.database)))  # fmt: skip

    # 1. The real thing: the first upload launches a run, which trains while the rest queue.
    uploaded = _stream(stack, bucket, "latency", csv)
    handled = _handled(stack)
    latency = [(handled[uri]["at"] - at) * 1000 for uri, at in uploaded.items()]
    own = [handled[uri]["ms"] for uri in uploaded]
    launched = [(handled[u]["at"] - uploaded[u]) * 1000 for u in uploaded
                if handled[u]["action"] == "launched"]  # fmt: skip
    assert wait_until(lambda: ledger.lease("latency") is None, timeout=180, interval=0.5)

    # 2. The function alone: a lease held by nobody's run keeps every event queued, so no
    #    pipeline competes for the 2 cores.
    assert ledger.acquire("quiet", "held-by-the-benchmark", ttl=3600).acquired
    quiet = _stream(stack, bucket, "quiet", csv)
    handled = _handled(stack)
    quiet_latency = [(handled[uri]["at"] - at) * 1000 for uri, at in quiet.items()]
    quiet_own = [handled[uri]["ms"] for uri in quiet]

    storm_uri = f"gs://{bucket.name}/storm/rows.csv"
    bucket.blob("storm/rows.csv").upload_from_string(csv)
    body, attributes = data_notification(storm_uri, gcs)
    publisher = emulators.publisher(stack.pubsub_host)
    topic = publisher.topic_path(stack.settings.project, stack.settings.topics.data_arrivals)
    log = stack.logs / "on_data_arrival.log"
    started = time.monotonic()
    for future in [publisher.publish(topic, body, **attributes) for _ in range(DUPLICATES)]:
        future.result(timeout=60)
    published = time.monotonic() - started
    assert wait_until(
        lambda: log.read_text(encoding="utf-8").count(f'"object": "{storm_uri}"') > DUPLICATES,
        timeout=120,
        interval=0.1,
    )
    storm_seconds = time.monotonic() - started
    assert wait_until(lambda: bool(ledger.runs("storm")), timeout=60)
    storm_runs = len(ledger.runs("storm"))
    assert storm_runs == 1

    print()
    print(f"{UPLOADS} uploads, one every ~20 ms, every_arrival model (first launches, rest queue)")
    print(f"  upload -> function handled:  {_percentiles(latency)}")
    print(f"  upload -> launched ({len(launched)}):     {_percentiles(launched)}")
    print(f"  function's own handling:    {_percentiles(own)}")
    print(f"{UPLOADS} uploads, the same, while no pipeline runs (every event queues)")
    print(f"  upload -> function handled:  {_percentiles(quiet_latency)}")
    print(f"  function's own handling:    {_percentiles(quiet_own)}")
    print(f"storm: {DUPLICATES} duplicate notifications of one object (+ the upload's own)")
    print(f"  published in {published:.2f} s; all handled {storm_seconds:.2f} s after the first")
    print(f"  runs started: {storm_runs}")
    Path(stack.state_dir / "bench-triggers.json").write_text(
        json.dumps({"latency_ms": latency, "own_ms": own, "storm_s": storm_seconds}), "utf-8"
    )
