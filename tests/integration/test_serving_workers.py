"""``python -m serving --workers 2`` on the real stack: both workers serve, and a decision on
Pub/Sub swaps the champion in both (each worker listens on its own subscription)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from google.api_core.exceptions import NotFound

from components.train import train
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.localstack import Stack
from retrain.localstack.processes import wait_until
from retrain.messages import Decision, encode
from retrain.statedb import Database
from tests.conftest import free_ports, unique
from tests.integration.test_serving import DATA, SPEC, register

pytestmark = pytest.mark.integration

WORKERS = 2


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    rainfall = pd.read_csv(DATA, nrows=1200).rename(columns={"Unnamed: 0": "day"})
    root = tmp_path_factory.mktemp("workers")
    dirs = []
    for i, rows in enumerate((rainfall.iloc[:600], rainfall.iloc[600:]), start=1):
        rows.to_parquet(root / f"train-{i}.parquet")
        dirs.append(train(root / f"train-{i}.parquet", SPEC, root / f"v{i}").model_path.parent)
    return dirs


@pytest.fixture
def model_name(stack: Stack, db: Database, gcs: Any) -> Iterator[str]:
    name = unique("workers")
    yield name
    db.client.recursive_delete(db.doc("registry", name))
    for blob in gcs.list_blobs(stack.settings.buckets.models, prefix=f"{name}/"):
        blob.delete()


@pytest.fixture
def subscription(stack: Stack, subscriber: Any) -> Iterator[str]:
    """A base subscription on model-decisions; the workers' own ones are deleted after too."""
    project = stack.settings.project
    name = unique(f"{stack.settings.topics.model_decisions}-serving")
    topic = f"projects/{project}/topics/{stack.settings.topics.model_decisions}"
    subscriber.create_subscription(name=subscriber.subscription_path(project, name), topic=topic)
    yield name
    for suffix in ("", *(f"-{k}" for k in range(WORKERS))):
        path = subscriber.subscription_path(project, name + suffix)
        with contextlib.suppress(NotFound):  # a worker that never started made none
            subscriber.delete_subscription(subscription=path)


def healthz(port: int) -> tuple[str, dict[str, Any]]:
    """(the answering process, the versions it serves), on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = json.loads(response.read())
        return response.getheader("X-Serving-Process") or "", body["models"]
    finally:
        connection.close()


def every_worker_serves(port: int, model: str, version: str, timeout: float) -> set[str]:
    """Poll /healthz on new connections until WORKERS processes answered ``version``; the
    processes that did (fewer if the time ran out)."""
    serving: dict[str, str | None] = {}

    def done() -> bool:
        try:
            process, models = healthz(port)
        except (OSError, http.client.HTTPException):
            return False
        serving[process] = models.get(model)
        return sum(v == version for v in serving.values()) >= WORKERS

    wait_until(done, timeout=timeout, interval=0.02)
    return {p for p, v in serving.items() if v == version}


def test_two_workers_serve_and_both_swap_on_a_decision(
    stack: Stack,
    gcs: Any,
    registry: FirestoreRegistry,
    publisher: Any,
    model_dirs: list[Path],
    model_name: str,
    subscription: str,
    tmp_path: Path,
) -> None:
    assert register(registry, gcs, model_name, model_dirs[0]) == "1"
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    raw["models"] = {model_name: SPEC.model_dump(mode="json", exclude_none=True)}
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "serving", "--config", str(config), "--port", str(port),
            "--workers", str(WORKERS), "--poll-seconds", "300", "--subscription", subscription,
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    log = (tmp_path / "serving.log").open("wb")
    server = subprocess.Popen(
        argv, env={**os.environ, **stack.env()}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        first = every_worker_serves(port, model_name, "1", timeout=90)
        assert len(first) == WORKERS, f"workers serving version 1: {first}; see {log.name}"

        assert register(registry, gcs, model_name, model_dirs[1]) == "2"
        decision = Decision(model=model_name, run_id="run-2", verdict="promoted",
                            reasons=["better"], new_version="2", previous_champion="1")  # fmt: skip
        topic = publisher.topic_path(stack.settings.project, stack.settings.topics.model_decisions)
        publisher.publish(topic, encode(decision)).result(timeout=30)

        # Polling is every 300 s: only the decision, delivered to each worker, swaps them.
        second = every_worker_serves(port, model_name, "2", timeout=60)
        assert second == first, f"swapped: {second} of {first}; see {log.name}"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
    assert server.returncode == 0, (tmp_path / "serving.log").read_text()[-2000:]
