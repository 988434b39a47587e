"""The monitor against the real Firestore emulator and fake-gcs-server: prediction-log objects
read by window, drift per window with the champion's real reference statistics, the cursor,
the windows kept, late labels joined, the live metrics, and the canary handed to the judge.

The champion is trained by the real train core on rainfall rows 0-2999 less every third
day; the held-out days are the unshifted traffic (tests/unit/test_drift.py measured them as
not drifting), and the same rows with two features moved by two standard deviations the
shifted traffic. The alert port claims through the real ledger and records what it would
publish: the service's own port (claim, then publish) is exercised end to end in
tests/e2e/test_monitor.py."""

from __future__ import annotations

import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from components.artifacts import MODEL_FILE
from components.train import train
from retrain import blobstore
from retrain.config import ModelSettings, Settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack
from retrain.localstack.processes import spawn, stop
from retrain.messages import DriftAlert, RetrainRequest, ScheduleMessage, decode
from retrain.monitoring import (
    LATE_SECONDS,
    Monitor,
    complete_windows,
    history,
    window_id,
    window_of,
)
from retrain.predictions import PredictionRecord, encode, object_name
from retrain.statedb import Database
from tests.conftest import ROOT, free_ports, unique, write_config

pytestmark = pytest.mark.integration

SHIFTED = ["dew point", "sea-level pressure"]
FEATURES = ["temperature", "dew point", "sea-level pressure", "visibility", "average wind speed",
            "max sustained wind-speed", "minimum temperature", "maximum temperature"]  # fmt: skip
WINDOW = 60.0


@pytest.fixture(scope="module")
def rows() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, held-out rows) of rainfall rows 0-2999: every third day held out."""
    data = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=3000)
    data = data.rename(columns={"Unnamed: 0": "day"})
    held = (data["day"] % 3 == 0).to_numpy()
    return data[~held].reset_index(drop=True), data[held].reset_index(drop=True)


def model_settings(**changes: Any) -> ModelSettings:
    return ModelSettings.model_validate(
        {
            "data_prefix": f"mon-{uuid.uuid4().hex[:8]}/",
            "label": "rain",
            "order_column": "day",
            "estimator": {"name": "HistGradientBoostingClassifier", "params": {"max_iter": 20}},
            "drift": {"min_drifted_features": 2},
            "monitoring": {"window_seconds": WINDOW, "min_rows": 50},
            **changes,
        }
    )


@pytest.fixture(scope="module")
def champion_dir(
    tmp_path_factory: pytest.TempPathFactory, rows: tuple[pd.DataFrame, pd.DataFrame]
) -> Path:
    directory = tmp_path_factory.mktemp("champion")
    rows[0].to_parquet(directory / "train.parquet")
    return train(
        directory / "train.parquet", model_settings(), directory / "model"
    ).model_path.parent


@dataclass
class World:
    """One model of its own: its settings, registry, ledger, and what the monitor sent."""

    name: str
    settings: Settings
    registry: FirestoreRegistry
    ledger: FirestoreLedger
    db: Database
    gcs: Any
    published: list[tuple[DriftAlert, str]] = field(default_factory=list)
    settled: list[tuple[str, dict[str, dict[str, float]]]] = field(default_factory=list)

    def alert(self, alert: DriftAlert, key: str) -> str | None:
        """The alert port: claim through the real ledger; publish (record) a new claim only."""
        request = RetrainRequest(
            model=alert.model, reason="drift", dedupe_key=key, trigger_event_id=key
        )
        if self.ledger.claim(request) != "new":
            return None
        self.published.append((alert, key))
        return f"message-{len(self.published)}"

    def settle_canary(self, model: str, live: dict[str, dict[str, float]]) -> Any:
        """The gatekeeper's port, recorded: the canary was rolled back."""
        self.settled.append((model, live))
        return type("Decision", (), {"verdict": "rolled_back"})()

    def monitor(self, now: float) -> Monitor:
        return Monitor(self.settings, self.db, self.registry, self.gcs, self.alert, self,
                       clock=lambda: now)  # fmt: skip

    def log(self, records: list[PredictionRecord], writer: str, seq: int) -> str:
        name = object_name(
            self.settings.predictions_prefix(self.name), records[0].time, writer, seq
        )
        bucket, path = blobstore.split_uri(name)
        self.gcs.bucket(bucket).blob(path).upload_from_string(encode(records))
        return name


def make_world(
    settings: Settings, db: Database, gcs: Any, champion_dir: Path, **changes: Any
) -> tuple[World, str]:
    name = f"mon-{uuid.uuid4().hex[:10]}"
    spec = model_settings(**changes)
    world_settings = settings.model_copy(update={"models": {**settings.models, name: spec}})
    registry = FirestoreRegistry(db, settings.buckets.models, gcs)
    uri = f"gs://{settings.buckets.models}/{name}/run-1/model"
    blobstore.upload_dir(champion_dir, uri, gcs)
    return World(name, world_settings, registry, FirestoreLedger(db), db, gcs), uri


def register(world: World, uri: str, run_id: str, metrics: dict[str, float]) -> str:
    return world.registry.register(
        world.name, {"run_id": run_id, "artifact_uri": uri, "metrics": metrics}
    )


def requests(model: str, frame: pd.DataFrame, at: float, version: str, per: int,
             as_objects: bool, estimator: Any = None) -> list[PredictionRecord]:  # fmt: skip
    """``frame``'s rows as requests of ``per`` instances, one every 0.1 s from ``at``, scored
    by ``estimator`` (or 0.5)."""
    features = [c for c in frame.columns if c not in ("day", "rain")]
    found = []
    for i, start in enumerate(range(0, len(frame), per)):
        chunk = frame.iloc[start : start + per]
        values = chunk[features].to_numpy()
        scores = (
            estimator.predict_proba(chunk[features])[:, 1].tolist()
            if estimator is not None
            else [0.5] * len(chunk)
        )
        instances = (
            [dict(zip(features, row, strict=True)) for row in values.tolist()]
            if as_objects
            else values.tolist()
        )
        found.append(PredictionRecord(f"{version}-{at:.0f}-{i}", at + i / 10, model, version,
                                      instances, scores))  # fmt: skip
    return found


def test_drifted_windows_raise_one_alert_each_and_a_second_pass_or_a_replay_nothing_new(
    stack: Stack,
    settings: Settings,
    db: Database,
    gcs: Any,
    champion_dir: Path,
    rows: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    w, uri = make_world(settings, db, gcs, champion_dir)
    register(w, uri, "run-1", {"accuracy": 0.8, "roc_auc": 0.85})
    assert w.registry.promote(w.name, "1", 0, "test", "first champion")
    held = rows[1]
    shifted = held.copy()
    for column in SHIFTED:
        shifted[column] += 2 * held[column].std()
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 20 * WINDOW
    # Window 0: unshifted; 1 and 2: shifted; 3: 40 rows (< min_rows 50); 4: nothing; 5:
    # unshifted again. Each window's rows come from two writers, as lists and as objects.
    plan = {0: held.iloc[:300], 1: shifted.iloc[:300], 2: shifted.iloc[300:600],
            3: held.iloc[:40], 5: held.iloc[600:900]}  # fmt: skip
    for index, frame in plan.items():
        start = t0 + index * WINDOW
        half = len(frame) // 2
        mine = requests(w.name, frame.iloc[:half], start + 1, "1", 5, as_objects=False)
        theirs = requests(w.name, frame.iloc[half:], start + 2, "1", 3, as_objects=True)
        w.log(mine, "host-a_1", index)
        w.log(theirs, "host-b_2", index)
    bad = object_name(w.settings.predictions_prefix(w.name), t0 + 2 * WINDOW + 5, "host-c_3", 0)
    bucket, path = blobstore.split_uri(bad)
    w.gcs.bucket(bucket).blob(path).upload_from_string(b'{"request_id": "x"}\nnot json\n')
    now = t0 + 6 * WINDOW + LATE_SECONDS

    first = w.monitor(now).check(w.name)

    by_start = {window["start"]: window for window in first.windows}
    assert sorted(by_start) == [t0 + i * WINDOW for i in (0, 1, 2, 3, 5)]  # 4 was empty
    assert [by_start[t0 + i * WINDOW]["served"] for i in (0, 1, 2, 3, 5)] == [300] * 3 + [40, 300]
    assert [by_start[t0 + i * WINDOW]["drifted"] for i in (0, 1, 2, 3, 5)] == [
        False, True, True, None, False,
    ]  # fmt: skip
    assert "40 rows < monitoring.min_rows 50" in by_start[t0 + 3 * WINDOW]["note"]
    for i in (1, 2):
        drift = by_start[t0 + i * WINDOW]["drift"]
        assert {n for n, f in drift.items() if f["drifted"]} >= set(SHIFTED)
        assert all(drift[n]["psi"] > 1.0 for n in SHIFTED)
    keys = [f"serving_drift:{w.name}:{window_id(t0 + i * WINDOW)}" for i in (1, 2)]
    assert [key for _, key in w.published] == keys
    assert [a["key"] for a in first.alerts] == keys
    alert = w.published[0][0]
    assert alert.kind == "serving_drift"
    assert alert.model == w.name
    assert set(alert.details["drift"]["drifted_features"][:2]) == set(SHIFTED)
    assert alert.details["window"] == {"start": t0 + WINDOW, "end": t0 + 2 * WINDOW}
    assert "dew point psi" in alert.summary
    assert [p for p in first.problems if p.startswith(f"{bad}, line 1: not a prediction record")]
    kept = {window["end"]: window for window in history(w.db, w.name, 50)}
    for i in (0, 1, 2, 3, 5):
        assert kept[t0 + (i + 1) * WINDOW]["served"] == by_start[t0 + i * WINDOW]["served"]
    assert kept[t0 + 2 * WINDOW]["alerts"] == {"serving_drift": "message-1"}
    assert kept[t0 + WINDOW]["alerts"] == {}
    assert w.db.read_path("monitoring", w.name).get("checked_until") == t0 + 6 * WINDOW

    again = w.monitor(now).check(w.name)
    assert again.windows == []  # the cursor moved past them
    assert len(w.published) == 2

    w.db.doc("monitoring", w.name).delete()  # a replay: the cursor is lost
    replay = w.monitor(now).check(w.name)
    assert [window["drifted"] for window in replay.windows] == [False, True, True, None, False]
    assert [a["message_id"] for a in replay.alerts] == [None, None]  # claimed before
    assert len(w.published) == 2
    kept = {window["end"]: window for window in history(w.db, w.name, 50)}
    assert kept[t0 + 2 * WINDOW]["alerts"] == {"serving_drift": "message-1"}  # kept
    events = [w.ledger.event(w.name, key) for key in keys]
    assert all(event is not None for event in events)


def test_late_labels_give_live_metrics_per_version_and_settle_the_canary(
    stack: Stack,
    settings: Settings,
    db: Database,
    gcs: Any,
    champion_dir: Path,
    rows: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    w, uri = make_world(
        settings, db, gcs, champion_dir,
        gate={"canary": {"percent": 10, "min_labelled": 200, "max_regression": 0.02}},
    )  # fmt: skip
    estimator = joblib.load(champion_dir / MODEL_FILE)
    held = rows[1].iloc[:600]
    permuted = held.copy()  # v2 answers with a feature permuted: worse on live traffic
    permuted["dew point"] = permuted["dew point"].sample(frac=1.0, random_state=5).to_numpy()
    # The served window is still open at `now` (it ends 6 s after it, within LATE_SECONDS):
    # it is not checked for drift, whatever the clock says. These 500 consecutive days drift
    # against the whole year's reference when a window holds them all; drift per window is
    # the test above's.
    now = time.time() // WINDOW * WINDOW - WINDOW + 54
    assert window_of(now - 48, WINDOW) not in complete_windows(now - 500, now, WINDOW)
    started = now - 50
    spread = rows[1].iloc[::10].reset_index(drop=True)  # the whole period: no drift
    old = requests(w.name, spread, now - 500, "1", 4, False, estimator)
    one = requests(w.name, held.iloc[100:400], started + 1, "1", 4, False, estimator)
    two = requests(w.name, permuted.iloc[400:600], started + 2, "2", 4, True, estimator)
    # Both versions passed the offline gate with v1's figures on these very rows.
    offline = estimator.predict_proba(held.iloc[100:400][FEATURES])[:, 1]
    y1 = held["rain"].iloc[100:400].to_numpy()
    evaluated = {"accuracy": float(accuracy_score(y1, offline >= 0.5)),
                 "roc_auc": float(roc_auc_score(y1, offline))}  # fmt: skip
    register(w, uri, "run-1", evaluated)
    assert w.registry.promote(w.name, "1", 0, "test", "first champion")
    register(w, uri, "run-2", evaluated)
    assert w.registry.promote(w.name, "2", 1, "gatekeeper", "canary")
    head = w.registry.head_doc(w.name)
    head.ref.update({"canary": {"version": "2", "previous": "1", "percent": 10,
                                "started_at": started, "generation": 2}})  # fmt: skip
    assert w.registry.canary(w.name) is not None
    for seq, batch in enumerate((old, one, two)):
        w.log(batch, "srv", seq)

    waiting = w.monitor(now).check(w.name)  # no labels yet
    assert waiting.canary == "v2 waits: 0 of 200 labelled predictions"
    # The judge hears every pass (it also finishes a Decision kept before a crash), and its
    # own policy waits for min_labelled: here nothing is labelled yet.
    ((_, early),) = w.settled
    assert early["2"]["labelled"] == 0
    w.settled.clear()
    assert waiting.live["versions"]["1"] == {"served": 300, "labelled": 0}

    # Labels for every v1 and v2 request in the window (and the old one), in two objects and
    # formats; one object for requests not logged yet, one broken object.
    lines = []
    for batch, frame, offset in ((one, held, 100), (two, permuted, 400), (old, spread, 0)):
        for r in batch:
            first = offset + 4 * int(r.request_id.rsplit("-", 1)[1])
            for index in range(len(r.instances)):
                lines.append((r.request_id, index, int(frame["rain"].iloc[first + index])))
    data = w.settings.buckets.data
    prefix = w.settings.labels_prefix(w.name)
    csv = "request_id,label,index\n" + "".join(f"{r},{y},{i}\n" for r, i, y in lines[:500])
    jsonl = "".join(
        f'{{"request_id": "{r}", "label": {y}, "index": {i}}}\n' for r, i, y in lines[500:]
    )
    gcs.bucket(data).blob(prefix + "a.csv").upload_from_string(csv)
    gcs.bucket(data).blob(prefix + "b.jsonl").upload_from_string(jsonl)
    gcs.bucket(data).blob(prefix + "future.csv").upload_from_string("request_id,label\nzz,1\n")
    gcs.bucket(data).blob(prefix + "broken.csv").upload_from_string("request_id,label\n,1\n")

    judged = w.monitor(now).check(w.name)

    assert any("broken.csv, row 2: field 'request_id'" in p for p in judged.problems)
    ((model, live),) = w.settled
    assert model == w.name
    for version, frame, batch, offset in (("1", held, one, 100), ("2", permuted, two, 400)):
        y = frame["rain"].iloc[offset : offset + 4 * len(batch)].to_numpy()
        scores = np.array([s for r in batch for s in r.scores])
        assert live[version]["served"] == live[version]["labelled"] == len(y)
        assert live[version]["roc_auc"] == pytest.approx(roc_auc_score(y, scores))
        assert live[version]["accuracy"] == pytest.approx(
            accuracy_score(y, (scores >= 0.5).astype(int))
        )
        assert judged.live["versions"][version] == live[version]  # the same rows here
    assert live["2"]["roc_auc"] < live["1"]["roc_auc"] - 0.05
    assert judged.canary == "v2 rolled_back on 200 labelled predictions"
    # v2 fell far below its evaluation figure, but it is the canary: its canary judges it,
    # and no degradation alert starts a run whose candidate could replace it unjudged.
    assert w.published == [], [(a.kind, a.summary) for a, _ in w.published]
    current = history(w.db, w.name, 1)[-1]
    assert current["live"]["1"] == live["1"]
    assert current["alerts"] == {}


def test_the_local_scheduler_sends_a_monitor_pass_every_monitor_seconds(
    stack: Stack, topic: str, subscriber: Any, tmp_path: Path
) -> None:
    """The scheduler process, on the real Pub/Sub emulator, publishing to a topic of the test's
    own: every monitor_seconds (5 here) a monitor message; the sweep (hourly) not yet."""
    config = write_config(tmp_path, monitor_seconds=5, sweep_seconds=3600,
                          topics={"retrain_schedule": topic})  # fmt: skip
    project = stack.settings.project
    subscription = subscriber.subscription_path(project, unique("ticks"))
    subscriber.create_subscription(name=subscription, topic=f"projects/{project}/topics/{topic}")
    (port,) = free_ports(1)
    started = time.monotonic()
    process = spawn(
        [sys.executable, "-m", "retrain.scheduler", "--config", str(config), "--port", str(port)],
        tmp_path / "scheduler.log", stack.env(), tmp_path,
    )  # fmt: skip
    try:
        got: list[Any] = []
        while len(got) < 2 and time.monotonic() - started < 60:
            response = subscriber.pull(subscription=subscription, max_messages=5, timeout=10)
            for received in response.received_messages:
                got.append(received.message)
                subscriber.acknowledge(subscription=subscription, ack_ids=[received.ack_id])
    finally:
        stop(process)
    assert len(got) >= 2, (tmp_path / "scheduler.log").read_text(encoding="utf-8")
    for message in got[:2]:
        assert decode(ScheduleMessage, message.data) == ScheduleMessage(model="*", reason="monitor")
        assert message.attributes["model"] == "*"
    assert time.monotonic() - started >= 10  # two ticks, 5 s apart, after a 5 s start
