"""The prediction log on fake-gcs-server: what the server writes, its sample rate, the flush
at shutdown, and a store outage (a real client against a port where nothing listens)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from retrain.config import Settings
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.predictions import PredictionRecord, decode, time_of
from serving.app import create_app
from serving.models import ModelStore
from serving.prediction_log import PredictionLog, Writer, gcs_writer
from tests.conftest import free_ports
from tests.unit.test_serving import SETTINGS, CopyDownloader, MemoryRegistry

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 but works with httpx; the warning is about packaging only.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration

BASE = f"/v1/projects/{SETTINGS.project}/locations/{SETTINGS.region}"
PREDICT = f"{BASE}/endpoints/rainfall:predict"


def settings_for(bucket: str, rate: float) -> Settings:
    """The unit tests' settings, logging rainfall at ``rate`` into ``bucket``."""
    raw = SETTINGS.model_dump(mode="json", exclude_none=True)
    raw["buckets"]["artifacts"] = bucket
    raw["models"]["rainfall"]["serving"] = {"log_sample_rate": rate}
    return Settings.model_validate(raw)


@pytest.fixture
def store(two_versions: list[Path], tmp_path: Path) -> ModelStore:
    registry = MemoryRegistry()
    registry.add("rainfall", "1", two_versions[0], champion=True)
    registry.add("rainfall", "2", two_versions[1])
    return ModelStore(["rainfall"], registry, CopyDownloader(), tmp_path / "cache")


@pytest.fixture
def instances(rainfall_rows: Any, two_versions: list[Path]) -> list[list[float | None]]:
    features = json.loads((two_versions[0] / "metadata.json").read_text())["features"]
    rows = rainfall_rows[features].iloc[:50].to_numpy().tolist()
    return [[None if math.isnan(v) else v for v in row] for row in rows]  # NaN: a missing value


def logged(gcs: Any, bucket: Any) -> dict[str, list[PredictionRecord]]:
    """Every prediction-log object of rainfall in ``bucket``: name -> records."""
    return {
        blob.name: decode(blob.download_as_bytes(), blob.name)
        for blob in gcs.list_blobs(bucket, prefix="predictions/rainfall/")
    }


def test_answers_land_in_the_bucket_with_the_version_that_answered(
    gcs: Any, bucket: Any, store: ModelStore, instances: list[list[float | None]]
) -> None:
    settings = settings_for(bucket.name, 1.0)
    plog = PredictionLog.for_settings(settings, gcs_writer(gcs))
    sent = []
    with TestClient(create_app(settings, store, prediction_log=plog)) as client:
        as_objects = [dict(zip("abcdefgh", row, strict=False)) for row in instances[:1]]
        bodies = [
            (PREDICT, {"X-Request-Id": "client-1"}, instances[:3]),
            (PREDICT, {}, instances[3:4]),
            (f"{BASE}/models/rainfall@2:predict", {"X-Request-Id": "pinned-1"}, instances[4:6]),
        ]
        for path, headers, rows in bodies:
            response = client.post(path, json={"instances": rows}, headers=headers)
            assert response.status_code == 200, response.text
            sent.append((response.headers["x-request-id"], rows, response.json()))
        refused = client.post(PREDICT, json={"instances": as_objects})
        assert refused.status_code == 400  # not the model's features: nothing logged
    objects = logged(gcs, bucket)
    assert len(objects) == 1
    ((name, records),) = objects.items()
    assert name.endswith(f"_{os.getpid()}-000001.jsonl")
    assert time_of(name) == pytest.approx(records[0].time, abs=1e-6)
    assert [r.request_id for r in records] == ["client-1", sent[1][0], "pinned-1"]
    for record, (rid, rows, answer) in zip(records, sent, strict=True):
        assert (record.request_id, record.model, record.version) == (
            rid,
            "rainfall",
            answer["modelVersionId"],
        )
        assert record.instances == rows
        assert record.scores == [p["probability"] for p in answer["predictions"]]
        assert record.labels == [p["label"] for p in answer["predictions"]]
    assert [r.version for r in records] == ["1", "1", "2"]
    assert plog.written == 3


def test_the_sample_rate_is_honoured(
    gcs: Any, bucket: Any, store: ModelStore, instances: list[list[float | None]]
) -> None:
    settings = settings_for(bucket.name, 0.5)
    plog = PredictionLog.for_settings(settings, gcs_writer(gcs))
    answered = set()
    with TestClient(create_app(settings, store, prediction_log=plog)) as client:
        for i in range(400):
            response = client.post(PREDICT, json={"instances": [instances[i % 50]]})
            assert response.status_code == 200
            answered.add(response.headers["x-request-id"])
    ids = [r.request_id for records in logged(gcs, bucket).values() for r in records]
    assert set(ids) <= answered
    assert len(ids) == len(set(ids)) == plog.written
    # Binomial(400, 0.5): sd 10; 5 sd either side fails about once in 1.7 million runs.
    assert 150 < len(ids) < 250, f"{len(ids)} of 400 logged at rate 0.5"


def test_shutdown_writes_what_is_buffered(
    gcs: Any, bucket: Any, store: ModelStore, instances: list[list[float | None]]
) -> None:
    settings = settings_for(bucket.name, 1.0)
    plog = PredictionLog.for_settings(settings, gcs_writer(gcs), flush_seconds=3600)
    with TestClient(create_app(settings, store, prediction_log=plog)) as client:
        ids = [
            client.post(PREDICT, json={"instances": [row]}).headers["x-request-id"]
            for row in instances[:20]
        ]
        assert logged(gcs, bucket) == {}, "written before the period or the shutdown"
        assert plog.pending() == 20
    assert [r.request_id for rs in logged(gcs, bucket).values() for r in rs] == ids


class Switch:
    """A writer that writes through ``down`` (a client of a port where nothing listens) until
    ``up`` is set, then through the real store."""

    def __init__(self, down: Writer, up: Writer) -> None:
        self.down, self.up = down, up
        self.is_up = False
        self.failures = 0

    def __call__(self, uri: str, data: bytes) -> object:
        if self.is_up:
            return self.up(uri, data)
        try:
            return self.down(uri, data)
        except Exception:
            self.failures += 1
            raise


@pytest.fixture
def dead_store(stack: Stack) -> Any:
    """A storage client of a fake-gcs-server that is not there."""
    (port,) = free_ports(1)
    return emulators.storage_client(f"http://127.0.0.1:{port}", stack.settings.project)


def test_a_store_outage_fails_no_request_and_drops_only_beyond_the_bound(
    gcs: Any, bucket: Any, store: ModelStore, instances: list[list[float | None]], dead_store: Any
) -> None:
    settings = settings_for(bucket.name, 1.0)
    switch = Switch(gcs_writer(dead_store), gcs_writer(gcs))
    plog = PredictionLog.for_settings(
        settings, switch, flush_seconds=0.05, max_retry_seconds=0.2, capacity=60
    )
    ids = []
    with TestClient(create_app(settings, store, prediction_log=plog)) as client:
        for i in range(50):
            response = client.post(PREDICT, json={"instances": [instances[i]]})
            assert response.status_code == 200, response.text
            ids.append(response.headers["x-request-id"])
        assert wait_until(lambda: switch.failures >= 2, timeout=30), "the store was never tried"
        assert (plog.pending(), plog.dropped) == (50, 0)
        for i in range(30):  # 80 in all: the 20 oldest go
            response = client.post(PREDICT, json={"instances": [instances[i]]})
            assert response.status_code == 200, response.text
            ids.append(response.headers["x-request-id"])
        assert wait_until(lambda: plog.dropped == 20, timeout=30)
        switch.is_up = True
        assert wait_until(lambda: plog.pending() == 0, timeout=30), "not written once back"
        assert logged(gcs, bucket) != {}
    kept = [r.request_id for rs in sorted(logged(gcs, bucket).items()) for r in rs[1]]
    assert kept == ids[20:]
    assert (plog.written, plog.dropped) == (60, 20)
