"""The canary's traffic split on a real uvicorn server (127.0.0.1) with real rainfall models:
a canary start, completion and rollback under concurrent load fail no request, each answer
comes from the version it names and the request id routes it; then the same on the real
stack (the canary in the Firestore pointer, decisions on Pub/Sub), read by the aiplatform SDK.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from retrain import blobstore
from retrain.config import Settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.localstack import Stack
from retrain.localstack.processes import wait_until
from retrain.messages import Decision, encode
from retrain.predictions import decode
from serving.app import create_app
from serving.models import ChampionWatcher, ModelStore, share_of
from serving.prediction_log import PredictionLog, gcs_writer
from tests.contract.sdk_config import use_fake
from tests.integration.test_serving import SPEC, register
from tests.integration.test_serving_batching import PATH, instances_of, proba, same, served
from tests.unit.test_serving import SETTINGS, CopyDownloader
from tests.unit.test_serving_canary import CanaryRegistry

pytestmark = pytest.mark.integration

CLIENTS = 16
PER_PHASE = 250  # answers in each phase before the next step
PERCENT = 30


def start(registry: CanaryRegistry) -> None:
    registry.start_canary("rainfall", "2", PERCENT)


def test_canary_start_completion_and_rollback_under_load_fail_no_request(
    two_versions: list[Path],
    rainfall_rows: pd.DataFrame,
    gcs: Any,
    bucket: Any,
    tmp_path: Path,
) -> None:
    features: list[str] = json.loads((two_versions[0] / "metadata.json").read_text())["features"]
    registry = CanaryRegistry()
    registry.add("rainfall", "1", two_versions[0], champion=True)
    registry.add("rainfall", "2", two_versions[1])
    store = ModelStore(["rainfall"], registry, CopyDownloader(), tmp_path / "cache")
    raw = SETTINGS.model_dump(mode="json", exclude_none=True)
    raw["buckets"]["artifacts"] = bucket.name
    settings = Settings.model_validate(raw)
    plog = PredictionLog.for_settings(settings, gcs_writer(gcs), flush_seconds=0.2)
    app = create_app(settings, store, prediction_log=plog)
    x = rainfall_rows[features].to_numpy(dtype=np.float64)
    want = {"1": proba(two_versions[0], x, features), "2": proba(two_versions[1], x, features)}
    # (request id, phase when sent, phase when answered, version, status)
    answers: list[tuple[str, str, str, str, int]] = []
    failures: list[str] = []
    phase = ["v1"]

    async def client_loop(c: int, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        chooser = np.random.default_rng(c)
        n = 0
        while not stop.is_set():
            start = int(chooser.integers(len(x) - 3))
            count = int(chooser.integers(1, 4))
            rid = f"c{c}-{n}"
            n += 1
            sent_in = phase[0]
            body = {"instances": instances_of(x[start : start + count], features, c % 2 == 0)}
            response = await client.post(PATH, json=body, headers={"X-Request-Id": rid})
            if response.status_code != 200 or response.headers["x-request-id"] != rid:
                failures.append(f"{rid}: {response.status_code} {response.text[:200]}")
                continue
            answer = response.json()
            version = answer["modelVersionId"]
            got = [p["probability"] for p in answer["predictions"]]
            if not same(got, want[version][start : start + count]):
                failures.append(f"{rid}: version {version} with another version's predictions")
            answers.append((rid, sent_in, phase[0], version, response.status_code))

    async def enough() -> None:
        """Wait for PER_PHASE answers in this phase."""
        deadline = time.monotonic() + 60
        while sum(a[2] == phase[0] for a in answers) < PER_PHASE and not failures:
            assert time.monotonic() < deadline, f"phase {phase[0]}: too few answers"
            await asyncio.sleep(0.01)

    async def next_phase(name: str, step: Any) -> None:
        """After PER_PHASE answers, change the pointer and refresh (load, warm, swap)."""
        await enough()
        step()
        assert await asyncio.to_thread(store.refresh, "rainfall")
        phase[0] = name

    async def scenario() -> None:
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
            tasks = [asyncio.create_task(client_loop(c, client, stop)) for c in range(CLIENTS)]
            try:
                await next_phase("canary", lambda: start(registry))
                await next_phase("completed", lambda: registry.complete("rainfall"))
                await next_phase("v1 again", lambda: registry.champions.update(rainfall="1"))
                await next_phase(
                    "canary 2", lambda: registry.start_canary("rainfall", "2", PERCENT)
                )
                await next_phase("rolled back", lambda: registry.roll_back("rainfall"))
                await enough()
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)

    with served(app) as base:
        asyncio.run(scenario())
    assert failures == []
    steady = {"v1": "1", "completed": "2", "v1 again": "1", "rolled back": "1"}
    in_canary = []
    for rid, sent_in, answered_in, version, _ in answers:
        if sent_in != answered_in:
            continue  # sent before a swap, answered after: either version is right
        if sent_in in steady:
            assert version == steady[sent_in], f"{rid} in phase {sent_in}: version {version}"
        elif sent_in in ("canary", "canary 2"):
            assert version == ("2" if share_of(rid) < PERCENT else "1"), f"{rid}: {version}"
            in_canary.append(version)
    # Binomial(n, 0.3) over at least 2 * PER_PHASE ids: within 5 sd of 30 %.
    n = len(in_canary)
    assert n >= PER_PHASE
    assert abs(in_canary.count("2") - 0.3 * n) < 5 * (n * 0.3 * 0.7) ** 0.5
    # The log names the version that answered each logged request.
    answered = {rid: version for rid, _, _, version, _ in answers}
    records = [
        record
        for blob in gcs.list_blobs(bucket, prefix="predictions/rainfall/")
        for record in decode(blob.download_as_bytes(), blob.name)
    ]
    assert len(records) >= len(answers)
    assert all(answered[r.request_id] == r.version for r in records if r.request_id in answered)


@pytest.mark.usefixtures("emulator_env")
def test_a_canary_in_the_firestore_pointer_is_served_split_and_read_by_the_sdk(
    stack: Stack,
    gcs: Any,
    db: Any,
    registry: FirestoreRegistry,
    publisher: Any,
    two_versions: list[Path],
    model_name: str,
    decisions_subscription: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings: Settings = stack.settings.model_copy(update={"models": {model_name: SPEC}})
    assert register(registry, gcs, model_name, two_versions[0]) == "1"
    assert register(registry, gcs, model_name, two_versions[1]) == "2"
    generation = registry.pointer(model_name).generation
    # What the gatekeeper writes when a promotion starts a canary (the same commit there).
    db.doc("registry", model_name).update(
        {
            "canary": {
                "version": "2",
                "previous": "1",
                "percent": 50,
                "started_at": time.time(),
                "generation": generation,
            }
        }
    )
    store = ModelStore(settings.models, registry, blobstore.download_dir, tmp_path / "cache")
    watcher = ChampionWatcher(store, settings.project, decisions_subscription, poll_seconds=300)
    topic = publisher.topic_path(settings.project, settings.topics.model_decisions)
    features = json.loads((two_versions[0] / "metadata.json").read_text())["features"]
    instance = dict.fromkeys(features, 0.5)

    with served(create_app(settings, store, watcher=watcher)) as base:
        use_fake(monkeypatch, base, settings.project, settings.region)
        from retrain.vertex_sdk import aiplatform  # noqa: PLC0415 (2.4 s to import)

        name = f"projects/{settings.project}/locations/{settings.region}/endpoints/{model_name}"
        endpoint = aiplatform().Endpoint(name)
        assert endpoint.traffic_split == {"2": 50, "1": 50}
        assert sorted(m.id for m in endpoint.list_models()) == ["1", "2"]
        versions = {endpoint.predict(instances=[instance]).deployed_model_id for _ in range(40)}
        assert versions == {"1", "2"}  # 1 in 2^39 to see only one

        assert watcher.listening.wait(30), "the streaming pull did not start"
        assert registry.rollback(model_name, generation, "test", "the canary was worse") == "1"
        decision = Decision(model=model_name, run_id="run-2", verdict="rolled_back",
                            reasons=["worse"], new_version="1", previous_champion="2",
                            stage="canary")  # fmt: skip
        publisher.publish(topic, encode(decision)).result(timeout=30)

        def rolled_back() -> bool:
            return _split(base, name) == {"1": 100}

        assert wait_until(rolled_back, timeout=15, interval=0.05), "not rolled back"
        assert {endpoint.predict(instances=[instance]).deployed_model_id for _ in range(5)} == {"1"}
    assert not watcher.running()


def _split(base: str, name: str) -> dict[str, int]:
    split: dict[str, int] = httpx.get(f"{base}/v1/{name}", timeout=10).json()["trafficSplit"]
    return split
