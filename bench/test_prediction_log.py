"""The prediction log's cost: 1-row requests to ``python -m serving`` with logging on (every
request, ``serving.log_sample_rate: 1``) and off (0), at concurrency 1 and 8, in interleaved
rounds (each round runs both servers, in turn order rotated), wrk as the load generator where
it is installed. The issue's target: logging costs at most 5 % of p99 at concurrency 8.

Latency on a shared machine is noisy, so each run also reports the server process's CPU time
per request (user + system, from the kernel's accounting), which other load barely moves:
the logging server's extra CPU per request is the cost of logging (the writer thread's
encoding and uploads included; fake-gcs-server's own work is not).

Run with ``make bench``. Prints each round and the medians; asserts only correctness (no
failed request, and the log holds what the logging server answered), never a timing.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from bench.peers.load import LoadResult, Target, generator, run_load
from bench.peers.model import feature_matrix, rainfall_rows, register_champion, train_model
from bench.peers.servers import Server, our_server, vertex_body
from retrain import statedb
from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.localstack import Stack
from retrain.predictions import decode, encode
from serving.prediction_log import PredictionLog
from tests.conftest import ROOT

pytestmark = pytest.mark.bench

ROUNDS = 6  # three were not enough: the same setting moved +-20 % between rounds
SECONDS = 5.0
CONCURRENCY = (1, 8)
MAX_REQUESTS = 200_000  # the Python load generator's bound (wrk is bound by time)


def _config(stack: Stack, directory: Path, model: str, rate: float) -> Path:
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    shipped = raw["models"]["rainfall"]
    raw["models"] = {model: {**shipped, "data_prefix": f"{model}/", "schedule": None,
                             "serving": {"log_sample_rate": rate}}}  # fmt: skip
    path = directory / f"serving-{rate:g}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def model(stack: Stack, gcs: Any) -> Iterator[str]:
    name = f"plog-{uuid.uuid4().hex[:8]}"
    yield name
    for blob in gcs.list_blobs(stack.settings.buckets.artifacts, prefix=f"predictions/{name}/"):
        blob.delete()


@pytest.mark.timeout(1800)
def test_prediction_log_overhead(
    stack: Stack, gcs: Any, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = stack.settings
    for key, value in stack.env().items():  # the registry's and the trainer's clients
        monkeypatch.setenv(key, value)
    on_config = _config(stack, tmp_path, model, 1.0)
    off_config = _config(stack, tmp_path, model, 0.0)
    spec = load_settings(on_config).models[model]
    folder = train_model(spec, tmp_path / "trained")
    registry = FirestoreRegistry(statedb.database(settings), settings.buckets.models, gcs)
    register_champion(registry, gcs, model, folder)
    features = list(spec.features or []) or _features(folder)
    body = vertex_body(feature_matrix(1, features))
    endpoint = f"/v1/projects/{settings.project}/locations/{settings.region}"
    tool = generator("auto")
    results: dict[tuple[str, int], list[LoadResult]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}  # CPU ms per request

    with ExitStack() as servers:
        started: dict[str, Server] = {}
        for name, config in (("on", on_config), ("off", off_config)):
            workdir = tmp_path / name
            workdir.mkdir()
            started[name] = servers.enter_context(
                our_server(config, stack.env(), model, endpoint, workdir, workers=1)
            )
        print(f"\nprediction log overhead: {tool}, {ROUNDS} rounds of {SECONDS:g} s, 1 row")
        for round_number in range(ROUNDS):
            order = ["on", "off"] if round_number % 2 == 0 else ["off", "on"]
            for concurrency in CONCURRENCY:
                for name in order:
                    server = started[name]
                    target = Target(server.port, server.path, body)
                    process = psutil.Process(server.pid)
                    run_load(target, concurrency, 1.0, 2000, tool)  # warm the connection path
                    before = sum(process.cpu_times()[:2])
                    result = run_load(target, concurrency, SECONDS, MAX_REQUESTS, tool)
                    used = sum(process.cpu_times()[:2]) - before
                    assert result.errors == 0, f"logging {name}: {result.errors} failed requests"
                    results.setdefault((name, concurrency), []).append(result)
                    cpu.setdefault((name, concurrency), []).append(1000 * used / result.requests)
                    print(
                        f"  round {round_number + 1} logging {name:>3} c{concurrency}: p50 "
                        f"{result.p50_ms:6.3f} ms  p99 {result.p99_ms:6.3f} ms  "
                        f"{result.rate:7.0f} req/s  CPU {cpu[(name, concurrency)][-1]:.3f} "
                        f"ms/request  (load {os.getloadavg()[0]:.1f})"
                    )
    # The servers stopped cleanly (SIGTERM): the log was flushed at shutdown.
    logged = [
        record
        for blob in gcs.list_blobs(settings.buckets.artifacts, prefix=f"predictions/{model}/")
        for record in decode(blob.download_as_bytes(), blob.name)
    ]
    answered_on = sum(r.requests for (name, _), rs in results.items() if name == "on" for r in rs)
    print(
        f"  logged {len(logged)} records; the logging server answered {answered_on} in the "
        "measured runs (and its warm-ups)"
    )
    assert logged, "the logging server wrote nothing"
    assert {r.version for r in logged} == {"1"}

    print("medians over the rounds (p50 / p99 in ms, requests/s):")
    for concurrency in CONCURRENCY:
        figures = {}
        for name in ("off", "on"):
            rs = results[(name, concurrency)]
            figures[name] = (
                statistics.median(r.p50_ms for r in rs),
                statistics.median(r.p99_ms for r in rs),
                statistics.median(r.rate for r in rs),
                statistics.median(cpu[(name, concurrency)]),
            )
            print(
                f"  c{concurrency} logging {name:>3}: p50 {figures[name][0]:6.3f}  "
                f"p99 {figures[name][1]:6.3f}  {figures[name][2]:7.0f} req/s  "
                f"CPU {figures[name][3]:.3f} ms/request"
            )
        ratio = figures["on"][1] / figures["off"][1]
        print(
            f"  c{concurrency}: p99 on/off {ratio:.3f} ({(ratio - 1) * 100:+.1f} %), "
            f"p50 on/off {figures['on'][0] / figures['off'][0]:.3f}, "
            f"throughput on/off {figures['on'][2] / figures['off'][2]:.3f}, "
            f"CPU per request on/off {figures['on'][3] / figures['off'][3]:.3f}"
            + ("   (target at c8: p99 overhead at most 5 %)" if concurrency == 8 else "")
        )


def _features(folder: Path) -> list[str]:
    import json  # noqa: PLC0415

    names: list[str] = json.loads((folder / "metadata.json").read_text())["features"]
    return names


def test_prediction_log_cpu_per_record() -> None:
    """The log's own work per record, in this process, without HTTP or a store: the request
    path (the draw and the append), then the writer thread's steps (records from the
    buffer, :func:`retrain.predictions.encode`). Robust to other load, unlike latency."""
    plog = PredictionLog({"m": 1.0}, {"m": "gs://b/predictions/m/"}, lambda _u, _d: None,
                         batch_records=1_000_000, capacity=1_000_000)  # fmt: skip
    x = feature_matrix(1, _features_of_rainfall())
    instances: list[Any] = x.tolist()
    predictions = [{"label": 0, "probability": 0.25}]
    ids = [uuid.uuid4().hex for _ in range(RECORDS)]
    best: dict[str, float] = {}
    for _ in range(5):  # the best of 5: the least disturbed by other work
        started = time.perf_counter()
        for rid in ids:
            if plog.sampled("m"):
                plog.append(rid, "m", "1", instances, predictions)
        appended = time.perf_counter()
        plog._take()
        taken = time.perf_counter()
        records = [r for o in plog._waiting for r in o.records]
        encode(records)
        encoded = time.perf_counter()
        plog._waiting.clear()
        plog._held = 0
        for step, seconds in (("append", appended - started), ("take", taken - appended),
                              ("encode", encoded - taken)):  # fmt: skip
            best[step] = min(best.get(step, seconds), seconds)
    print(f"\nprediction log, CPU per record (1 row, best of 5 x {RECORDS} records):")
    for step, seconds in best.items():
        print(f"  {step:>6}: {seconds / RECORDS * 1e6:6.2f} us")


RECORDS = 5000


def _features_of_rainfall() -> list[str]:
    shipped = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    label = shipped["models"]["rainfall"]["label"]
    columns = rainfall_rows(1).columns
    return [c for c in columns if c not in ("Unnamed: 0", "day", label)]
