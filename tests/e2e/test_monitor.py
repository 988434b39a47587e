"""Issue 15's acceptance (1) and (2) on the whole local stack: a model trained by a real run
and served by the prediction server; its answers logged in the prediction-log format
(retrain/predictions.py; the server's own logging is another part of the issue, so the test
writes the log objects from the server's answers); the monitor's pass started as in
production, by a ``monitor`` message to retrain-schedule, and by ``retrain monitor``.

(1) served inputs shifted as in the drift tests raise exactly one ``serving_drift`` alert
    per window, an unshifted copy none, and a replayed pass starts nothing new;
(2) late labels (``retrain publish labels``) give the live metric per version, equal to an
    offline computation on the same rows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from google.cloud import pubsub_v1
from sklearn.metrics import accuracy_score, roc_auc_score

from retrain import blobstore
from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack
from retrain.localstack.processes import wait_until
from retrain.messages import DriftAlert, ScheduleMessage, decode, encode
from retrain.monitoring import window_id
from retrain.predictions import PredictionRecord, object_name
from retrain.predictions import encode as encode_log
from retrain.statedb import Database
from tests.conftest import QUICK_MODEL, rainfall, settled, upload, write_config
from tests.e2e.conftest import subscribed

pytestmark = pytest.mark.e2e

MODEL = "watched"
WINDOW = 300.0
RAINFALL = rainfall(3000)
FEATURES = [c for c in RAINFALL.columns if c not in ("day", "rain")]
SHIFTED = ["dew point", "sea-level pressure"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of this module's own. Its scheduler sweeps and monitors once an hour: the
    passes of this module are the tests' own."""
    watched = {
        **QUICK_MODEL,
        "data_prefix": f"{MODEL}/",
        "arrival_policy": "on_drift",  # only the first upload trains; alerts start the rest
        "drift": {**QUICK_MODEL["drift"], "min_drifted_features": 2},
        "monitoring": {"window_seconds": WINDOW, "min_rows": 100},
        # The tests write the server's answers to the log themselves, at the times they
        # choose (past windows, complete at once); the server's own log would add its
        # answers at the time they were made. That path: tests/e2e/test_canary.py.
        "serving": {"log_sample_rate": 0.0},
    }
    path = write_config(
        tmp_path_factory.mktemp("monitor"), models={MODEL: watched}, sweep_seconds=3600,
        monitor_seconds=3600,
    )  # fmt: skip
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


@pytest.fixture
def alerts(stack: Stack, subscriber: pubsub_v1.SubscriberClient) -> Iterator[str]:
    yield from subscribed(stack, subscriber, stack.settings.topics.drift_alerts, "alerts")


def pull(subscriber: pubsub_v1.SubscriberClient, subscription: str, wanted: int,
         timeout: float) -> list[Any]:  # fmt: skip
    """Messages until ``wanted`` arrived or ``timeout`` passed (then what arrived)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < wanted and time.monotonic() < deadline:
        wait = max(0.5, min(5.0, deadline - time.monotonic()))
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=wait)
        for received in response.received_messages:
            got.append(received.message)
            subscriber.acknowledge(subscription=subscription, ack_ids=[received.ack_id])
    return got


def predict(stack: Stack, rows: list[list[float]], version: str | None = None) -> dict[str, Any]:
    s = stack.settings
    base = (f"http://{s.local.host}:{s.local.ports.serving}/v1/projects/{s.project}/locations/"
            f"{s.region}")  # fmt: skip
    url = (
        f"{base}/models/{MODEL}@{version}:predict"
        if version
        else f"{base}/endpoints/{MODEL}:predict"
    )
    request = urllib.request.Request(
        url, data=json.dumps({"instances": rows}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def answers(stack: Stack) -> bool:
    try:
        predict(stack, [[0.0] * len(FEATURES)])
    except urllib.error.HTTPError:
        return False
    return True


def served(stack: Stack, frame: pd.DataFrame, at: float, tag: str, version: str | None = None,
           per: int = 20) -> list[PredictionRecord]:  # fmt: skip
    """Ask the prediction server about ``frame``'s rows, ``per`` a request, one request every
    0.1 s from ``at``; the records its logging would write."""
    records = []
    for i, start in enumerate(range(0, len(frame), per)):
        rows = frame[FEATURES].iloc[start : start + per].to_numpy().tolist()
        answer = predict(stack, rows, version)
        records.append(PredictionRecord(
            request_id=f"{tag}-{i}", time=at + i / 10, model=MODEL,
            version=str(answer["modelVersionId"]), instances=rows,
            scores=[p["probability"] for p in answer["predictions"]],
            labels=[p["label"] for p in answer["predictions"]],
        ))  # fmt: skip
    return records


def write_log(stack: Stack, storage: Any, records: list[PredictionRecord], seq: int) -> None:
    name = object_name(stack.settings.predictions_prefix(MODEL), records[0].time, "test_1", seq)
    bucket, path = blobstore.split_uri(name)
    storage.bucket(bucket).blob(path).upload_from_string(encode_log(records))


def retrain_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args, "--config", str(stack.config_path)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip


def covered(ledger: FirestoreLedger) -> list[str]:
    return [e["dedupe_key"] for r in ledger.runs(MODEL) for e in r.events]


def test_shifted_windows_raise_one_serving_drift_alert_each_and_a_replay_nothing_new(
    stack: Stack,
    storage: Any,
    state: Database,
    ledger: FirestoreLedger,
    registry: FirestoreRegistry,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    alerts: str,
) -> None:
    upload(storage, stack, f"{MODEL}/rows-0-2999.csv", RAINFALL)
    settled(ledger, MODEL, runs=1)
    assert wait_until(lambda: registry.champion(MODEL) is not None, timeout=60)
    assert wait_until(lambda: answers(stack), timeout=60), "the champion is not served"
    # Four past windows: an unshifted copy, two shifted as in the drift tests (two features
    # moved by two standard deviations), an unshifted copy again.
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 8 * WINDOW
    for index in range(4):
        frame = RAINFALL.sample(n=200, random_state=index).reset_index(drop=True)
        if index in (1, 2):
            for column in SHIFTED:
                frame[column] += 2 * RAINFALL[column].std()
        write_log(stack, storage, served(stack, frame, t0 + index * WINDOW + 1, f"w{index}"), index)
    keys = [f"serving_drift:{MODEL}:{window_id(t0 + i * WINDOW)}" for i in (1, 2)]

    # As Cloud Scheduler (locally, the scheduler) sends it every monitor_seconds.
    topic = publisher.topic_path(stack.settings.project, stack.settings.topics.retrain_schedule)
    tick = ScheduleMessage(model="*", reason="monitor")
    publisher.publish(topic, encode(tick), model="*").result(timeout=30)

    # Two; a third (one too many) would still be waiting for the empty pull after the replay.
    messages = pull(subscriber, alerts, wanted=2, timeout=120)
    got = sorted((m.attributes["retrain_dedupe_key"], decode(DriftAlert, m.data)) for m in messages)
    assert [key for key, _ in got] == keys, [a.summary for _, a in got]
    for key, alert in got:
        assert alert.kind == "serving_drift"
        assert alert.model == MODEL
        assert set(alert.details["drift"]["drifted_features"][:2]) == set(SHIFTED), alert.summary
        assert alert.details["window"]["start"] == float(key.rsplit(":", 1)[1])

    # The cursor passes the four windows and the empty complete ones after them (the pass
    # publishes each alert before it moves on).
    def checked_until() -> float:
        return float(state.read_path("monitoring", MODEL).get("checked_until") or 0)

    assert wait_until(lambda: checked_until() >= t0 + 4 * WINDOW, timeout=120), checked_until()
    # Each alert's run was claimed before it was published; on_drift found it claimed.
    runs = settled(ledger, MODEL, runs=2, timeout=300)
    assert sorted(k for k in covered(ledger) if k.startswith("serving_drift:")) == keys
    assert {r.reason for r in runs[1:]} == {"drift"}

    # A second pass finds nothing to check; a replay (the cursor lost) checks the windows
    # again, raises the same two alerts, and claims and publishes nothing new.
    again = retrain_cli(stack, "monitor", MODEL, "--json")
    assert again.returncode == 0, again.stderr
    (second,) = json.loads(again.stdout)
    assert second["pass"]["windows"] == []
    state.doc("monitoring", MODEL).delete()
    replay = retrain_cli(stack, "monitor", MODEL, "--json")
    assert replay.returncode == 0, replay.stderr
    (replayed,) = json.loads(replay.stdout)
    assert [w["drifted"] for w in replayed["pass"]["windows"]] == [False, True, True, False]
    assert [(a["key"], a["message_id"]) for a in replayed["pass"]["alerts"]] == [
        (key, None) for key in keys
    ]
    assert pull(subscriber, alerts, wanted=1, timeout=10) == []
    assert len(settled(ledger, MODEL, runs=len(runs))) == len(runs)
    shown = {w["end"]: w for w in replayed["windows"]}
    assert [shown[t0 + (i + 1) * WINDOW]["served"] for i in range(4)] == [200] * 4
    assert shown[t0 + 2 * WINDOW]["alerts"]["serving_drift"] == next(
        m.message_id for m in messages if m.attributes["retrain_dedupe_key"] == keys[0]
    )
    table = retrain_cli(stack, "monitor", MODEL)
    assert table.returncode == 0, table.stderr
    assert "yes: " in table.stdout, table.stdout
    assert "dew point psi" in table.stdout, table.stdout


def test_late_labels_give_the_live_metric_per_version_as_computed_offline(
    stack: Stack, storage: Any, registry: FirestoreRegistry, tmp_path: Path
) -> None:
    versions = [r["version"] for r in registry.records(MODEL)]
    assert len(versions) >= 2, "the first test's drift run registers a second version"
    now = time.time()
    traffic = RAINFALL.sample(n=600, random_state=11).reset_index(drop=True)
    asked: dict[str, tuple[pd.DataFrame, list[PredictionRecord]]] = {}
    for n, version in enumerate(versions[:2]):
        frame = traffic.iloc[n * 300 : (n + 1) * 300].reset_index(drop=True)
        asked[version] = (frame, served(stack, frame, now - 60 + n, f"live{n}", version))
        write_log(stack, storage, asked[version][1], 10 + n)
    # Labels for 2 of every 3 instances, late, half as CSV and half as JSON lines; one for a
    # request not logged yet (it waits).
    csv, jsonl = ["request_id,label,index"], []
    joined: dict[str, list[tuple[int, float, int]]] = {}
    for version, (frame, records) in asked.items():
        for r in records:
            first = int(r.request_id.rsplit("-", 1)[1]) * 20
            for index, (score, said) in enumerate(zip(r.scores, r.labels, strict=True)):
                if (first + index) % 3 == 2:
                    continue
                truth = int(frame["rain"].iloc[first + index])
                joined.setdefault(version, []).append((truth, score, int(said)))
                if version == versions[0]:
                    csv.append(f"{r.request_id},{truth},{index}")
                else:
                    jsonl.append(json.dumps({"request_id": r.request_id, "label": truth,
                                             "index": index}))  # fmt: skip
    csv.append("not-logged-yet,1,0")
    (tmp_path / "labels.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    (tmp_path / "labels.jsonl").write_text("\n".join(jsonl) + "\n", encoding="utf-8")
    (tmp_path / "bad.csv").write_text("request_id,label,index\nr1,1,first\n", encoding="utf-8")
    for name in ("labels.csv", "labels.jsonl"):
        sent = retrain_cli(stack, "publish", "labels", MODEL, str(tmp_path / name))
        assert sent.returncode == 0, sent.stderr
        assert f"gs://{stack.settings.buckets.data}/labels/{MODEL}/" in sent.stdout
    refused = retrain_cli(stack, "publish", "labels", MODEL, str(tmp_path / "bad.csv"))
    assert refused.returncode == 2
    assert "row 2: field 'index' must be a whole number" in refused.stderr

    done = retrain_cli(stack, "monitor", MODEL, "--json")

    assert done.returncode == 0, done.stderr
    (found,) = json.loads(done.stdout)
    live = found["pass"]["live"]["versions"]
    for version, rows in joined.items():
        actual = np.array([t for t, _, _ in rows])
        scores = np.array([s for _, s, _ in rows])
        said = np.array([p for _, _, p in rows])
        assert live[version]["served"] == 300
        assert live[version]["labelled"] == len(rows) == 200
        assert live[version]["roc_auc"] == pytest.approx(roc_auc_score(actual, scores))
        assert live[version]["accuracy"] == pytest.approx(accuracy_score(actual, said))
    current = found["windows"][-1]
    assert current["live"] == live
    table = retrain_cli(stack, "monitor", MODEL)
    assert f"v{versions[0]} roc_auc {live[versions[0]]['roc_auc']:.4f}" in table.stdout
