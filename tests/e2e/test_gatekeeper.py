"""Upload -> run -> gatekeeper -> registry -> prediction service, on the whole local stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from google.cloud import pubsub_v1

from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack
from retrain.localstack.processes import wait_until
from retrain.messages import Decision, MetricsReport, decode, encode
from tests.conftest import QUICK_MODEL, rainfall, settled, unique, upload, write_config
from tests.e2e.conftest import subscribed

pytestmark = pytest.mark.e2e

RAINFALL = rainfall(6000)
QUICK = QUICK_MODEL


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    models = {name: {**QUICK, "data_prefix": f"{name}/"} for name in ("served", "reports")}
    path = write_config(tmp_path_factory.mktemp("gatekeeper"), models=models)
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


@pytest.fixture
def decisions(stack: Stack, subscriber: pubsub_v1.SubscriberClient) -> Iterator[str]:
    yield from subscribed(stack, subscriber, stack.settings.topics.model_decisions, "decisions")


def pull_decisions(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, wanted: int, timeout: float = 120
) -> list[Decision]:
    got: list[Decision] = []
    deadline = time.monotonic() + timeout
    while len(got) < wanted and time.monotonic() < deadline:
        wait = max(0.5, min(5.0, deadline - time.monotonic()))
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=wait)
        for received in response.received_messages:
            got.append(decode(Decision, received.message.data))
            subscriber.acknowledge(subscription=subscription, ack_ids=[received.ack_id])
    return got


def retrain_cli(
    stack: Stack, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args, "--config", str(stack.config_path)],
        capture_output=True, text=True, timeout=120, check=False, input=stdin,
        env={**os.environ, "COLUMNS": "250", "RETRAIN_OPERATOR": "test-operator"},
    )  # fmt: skip


def endpoint(stack: Stack, model: str) -> str:
    s = stack.settings
    return (f"http://{s.local.host}:{s.local.ports.serving}/v1/projects/{s.project}/locations/"
            f"{s.region}/endpoints/{model}")  # fmt: skip


def predict(stack: Stack, model: str, rows: list[list[float]]) -> dict[str, Any]:
    request = urllib.request.Request(
        endpoint(stack, model) + ":predict",
        data=json.dumps({"instances": rows}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


FEATURES = [c for c in RAINFALL.columns if c not in ("day", "rain")]


def served_version(stack: Stack, model: str) -> str | None:
    try:
        return str(predict(stack, model, [[0.0] * len(FEATURES)])["modelVersionId"])
    except urllib.error.HTTPError:
        return None


def test_upload_to_served_then_worse_rejected_then_rollback(
    stack: Stack,
    gcs: Any,
    ledger: FirestoreLedger,
    registry: FirestoreRegistry,
    subscriber: pubsub_v1.SubscriberClient,
    decisions: str,
) -> None:
    # 1. Data lands; the run's candidate passes the gate and is served.
    upload(gcs, stack, "served/rows-0-2999.csv", RAINFALL.iloc[:3000])
    settled(ledger, "served", runs=1)
    (first,) = pull_decisions(subscriber, decisions, 1)
    assert first.verdict == "promoted", first.reasons
    assert first.new_version == "1"
    assert first.previous_champion is None
    assert wait_until(lambda: served_version(stack, "served") == "1", timeout=30)
    rows = RAINFALL[FEATURES].iloc[3000:3005].to_numpy().tolist()
    answer = json.loads(
        retrain_cli(stack, "predict", "served", "--instances", "-",
                    stdin=json.dumps({"instances": rows})).stdout
    )  # fmt: skip
    assert answer["modelVersionId"] == "1"
    assert [0 <= p["probability"] <= 1 for p in answer["predictions"]] == [True] * 5

    # 2. A better-informed candidate (more data) is promoted; the served version changes.
    upload(gcs, stack, "served/rows-3000-5999.csv", RAINFALL.iloc[3000:6000])
    settled(ledger, "served", runs=2)
    (second,) = pull_decisions(subscriber, decisions, 1)
    # 3. A worse candidate (shuffled labels) is rejected, and the reasons name the rule.
    noise = RAINFALL.iloc[3000:6000].copy()
    noise["rain"] = noise["rain"].sample(frac=1.0, random_state=3).to_numpy()
    noise["day"] += 10_000  # newest rows: the training window is all noise
    upload(gcs, stack, "served/shuffled.csv", noise)
    settled(ledger, "served", runs=3)
    (third,) = pull_decisions(subscriber, decisions, 1)
    assert third.verdict == "rejected"
    assert any("roc_auc" in r and r.endswith("FAIL") for r in third.reasons), third.reasons
    champion = registry.champion("served")
    assert champion is not None
    expected = second.new_version if second.verdict == "promoted" else "1"
    assert champion.version == expected
    assert wait_until(lambda: served_version(stack, "served") == expected, timeout=30)

    listed = retrain_cli(stack, "versions", "served")
    assert listed.returncode == 0, listed.stderr
    assert "v3 rejected" in listed.stdout
    assert f"v{expected} * champion" in listed.stdout

    # 4. Rollback (by hand, recorded) is visible in the next prediction.
    if expected != "1":
        back = retrain_cli(stack, "rollback", "served", "--reason", "testing rollback")
        assert back.returncode == 0, back.stderr
        assert wait_until(lambda: served_version(stack, "served") == "1", timeout=30)
        pointer = registry.champion_record("served")
        assert pointer is not None
        assert pointer["by"] == "test-operator"
        assert pointer["reason"] == "rollback: testing rollback"
        assert registry.audit("served")[-1]["action"] == "rollback"


def _gatekeeper_lines(stack: Stack, run_id: str) -> int:
    """How many deliveries about ``run_id`` the gatekeeper function has logged."""
    log = stack.logs / "gatekeeper.log"
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return sum(1 for line in lines if f'"run_id": "{run_id}"' in line)


def _report_copy(registry: FirestoreRegistry, gcs: Any, stack: Stack, run_id: str) -> MetricsReport:
    kept = json.loads(
        gcs.bucket(stack.settings.buckets.artifacts)
        .blob(f"runs/reports/{run_id}/report.json")
        .download_as_bytes()
    )
    return MetricsReport.model_validate(kept["report"])


def test_duplicate_and_racing_reports(
    stack: Stack,
    gcs: Any,
    ledger: FirestoreLedger,
    registry: FirestoreRegistry,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    decisions: str,
) -> None:
    upload(gcs, stack, "reports/rows.csv", RAINFALL.iloc[:3000])
    (run,) = settled(ledger, "reports", runs=1)
    pull_decisions(subscriber, decisions, 1)
    original = _report_copy(registry, gcs, stack, run.run_id)
    topic = publisher.topic_path(stack.settings.project, stack.settings.topics.model_metrics)
    versions_before = len(registry.records("reports"))

    # The same report delivered twice more: still one version and one decision. (The
    # gatekeeper's log says when it handled both; then nothing may have been published.)
    handled = _gatekeeper_lines(stack, run.run_id)
    for _ in range(2):
        publisher.publish(topic, encode(original)).result(timeout=30)
    assert wait_until(lambda: _gatekeeper_lines(stack, run.run_id) >= handled + 2, timeout=60)
    assert not pull_decisions(subscriber, decisions, 1, timeout=2)
    assert len(registry.records("reports")) == versions_before

    # Forged reports (runs the ledger never launched), racing, better than the champion:
    # refused and kept for audit; no decision, no version, the champion does not move.
    champion = registry.champion("reports")
    assert champion is not None
    assert original.candidate is not None
    better = {**original.candidate.metrics, "roc_auc": 0.99}
    forged = [
        original.model_copy(update={
            "run_id": unique("forged"),
            "candidate": original.candidate.model_copy(update={"metrics": better}),
        })
        for _ in range(2)
    ]  # fmt: skip
    barrier = threading.Barrier(2)

    def send(report: MetricsReport) -> None:
        barrier.wait(timeout=10)
        publisher.publish(topic, encode(report)).result(timeout=30)

    threads = [threading.Thread(target=send, args=(r,)) for r in forged]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert wait_until(lambda: len(registry.refused("reports")) == 2, timeout=60)
    refused = registry.refused("reports")
    assert {r["run_id"] for r in refused} == {r.run_id for r in forged}
    assert all("not launched by the ledger" in r["why"] for r in refused)
    assert not pull_decisions(subscriber, decisions, 1, timeout=2)
    assert len(registry.records("reports")) == versions_before
    final = registry.champion("reports")
    assert final is not None
    assert final.version == champion.version


def test_load_during_a_swap_sees_no_error(stack: Stack, registry: FirestoreRegistry) -> None:
    """Runs after the first test: `served` has at least two versions to swap between."""
    records = registry.records("served")
    champion = registry.champion("served")
    assert champion is not None
    assert len(records) >= 2
    other = next(r["version"] for r in records if r["version"] != champion.version)
    rows = RAINFALL[FEATURES].iloc[:4].to_numpy().tolist()
    seen: dict[str, int] = {}
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 60
        for _ in range(20_000):  # bounded in count and in time
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                version = str(predict(stack, "served", rows)["modelVersionId"])
                seen[version] = seen.get(version, 0) + 1
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(repr(exc))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        assert wait_until(lambda: sum(seen.values()) > 50, timeout=30)
        moved = retrain_cli(stack, "promote", "served", other, "--reason", "swap under load")
        assert moved.returncode == 0, moved.stderr
        assert wait_until(lambda: seen.get(other, 0) > 50, timeout=30), seen
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert errors == []
    assert seen[champion.version] > 0
    assert seen[other] > 0
