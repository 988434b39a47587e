"""Adaptive batching on a real uvicorn server (127.0.0.1), with real models trained on
rainfall: batched answers equal unbatched ones, a bad request in a batch gets its own 400,
and a champion swap under concurrent load loses no request. Large batches in predict
processes (really spawned): the same answers as the thread, the version each request was
routed to in every process, a killed process replaced without a failed request, small
batches never sent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import numpy.typing as npt
import pandas as pd
import psutil
import pytest
import uvicorn
from starlette.applications import Starlette

from components.train import train
from retrain.gatekeeper.registry import ModelVersion
from retrain.localstack.processes import wait_until
from serving.app import create_app
from serving.batching import Batcher, Batchers, predict_threads
from serving.models import LoadedModel, ModelStore, load_model
from serving.predict_processes import PROCESS_MIN_ROWS, PredictProcesses
from serving.small_batches import TOLERANCE
from tests.conftest import free_ports
from tests.unit.test_serving import DATA, SETTINGS, CopyDownloader, MemoryRegistry

pytestmark = pytest.mark.integration

PATH = f"/v1/projects/{SETTINGS.project}/locations/{SETTINGS.region}/endpoints/rainfall:predict"
# Held inside predict_proba while set: picklable estimators keep only the key.
GATES: dict[str, tuple[threading.Event, threading.Event]] = {}


class Gated:
    """A real estimator whose predict_proba can be held (to fill a batch behind it)."""

    def __init__(self, inner: Any, key: str) -> None:
        self.inner = inner
        self.key = key
        self.classes_ = inner.classes_

    def predict_proba(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        gate = GATES.get(self.key)
        if gate is not None:
            entered, release = gate
            entered.set()
            assert release.wait(30)
        result: npt.NDArray[np.float64] = self.inner.predict_proba(x)
        return result


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return pd.read_csv(DATA, nrows=1200).rename(columns={"Unnamed: 0": "day"})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, rows: pd.DataFrame) -> list[Path]:
    """Version 1 on rows 0-599, version 2 on rows 600-1199, and version 3: version 1's
    model behind a gate."""
    root = tmp_path_factory.mktemp("batching")
    dirs = []
    for i, part in enumerate((rows.iloc[:600], rows.iloc[600:]), start=1):
        part.to_parquet(root / f"train-{i}.parquet")
        spec = SETTINGS.models["rainfall"]
        dirs.append(train(root / f"train-{i}.parquet", spec, root / f"v{i}").model_path.parent)
    gated = root / "v3"
    gated.mkdir()
    inner = joblib.load(dirs[0] / "model.joblib")
    del inner.feature_names_in_  # served from arrays, as load_model does
    joblib.dump(Gated(inner, "v3"), gated / "model.joblib")
    (gated / "metadata.json").write_text((dirs[0] / "metadata.json").read_text())
    dirs.append(gated)
    return dirs


@pytest.fixture(scope="module")
def features(model_dirs: list[Path]) -> list[str]:
    names: list[str] = json.loads((model_dirs[0] / "metadata.json").read_text())["features"]
    return names


def proba(model_dir: Path, x: npt.NDArray[np.float64], features: list[str]) -> list[float]:
    """The model's own predict_proba on all of ``x`` at once (the unbatched answer)."""
    estimator = joblib.load(model_dir / "model.joblib")
    result: list[float] = estimator.predict_proba(pd.DataFrame(x, columns=features))[:, 1].tolist()
    return result


def same(got: list[float], want: list[float]) -> bool:
    """The same answers: equal but for rounding (small batches are predicted by treelite,
    whose sums are ordered otherwise than scikit-learn's, serving.small_batches)."""
    return len(got) == len(want) and bool(np.allclose(got, want, rtol=0, atol=TOLERANCE))


@contextmanager
def served(app: Starlette) -> Iterator[str]:
    """``app`` on a real uvicorn server on 127.0.0.1, in a thread; its base URL."""
    (port,) = free_ports(1)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=30, interval=0.02), "no server"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def make_store(registry: MemoryRegistry, tmp_path: Path) -> ModelStore:
    return ModelStore(["rainfall"], registry, CopyDownloader(), tmp_path / "cache")


def instances_of(x: npt.NDArray[np.float64], features: list[str], as_objects: bool) -> list[Any]:
    """JSON instances; NaN becomes null (a missing value)."""
    rows = [[None if np.isnan(v) else v for v in row] for row in x.tolist()]
    if as_objects:
        return [dict(zip(features, row, strict=True)) for row in rows]
    return rows


def test_hundreds_of_concurrent_requests_get_what_unbatched_predicts(
    model_dirs: list[Path], rows: pd.DataFrame, features: list[str], tmp_path: Path
) -> None:
    registry = MemoryRegistry()
    registry.add("rainfall", "1", model_dirs[0], champion=True)
    app = create_app(SETTINGS, make_store(registry, tmp_path))
    rng = np.random.default_rng(7)
    x = rows[features].to_numpy(dtype=np.float64)[rng.integers(0, len(rows), 1000)]
    x[rng.random(x.shape) < 0.02] = np.nan  # some nulls
    x[::3] = x[::3].astype(np.float32)  # some rows at float32 precision
    want = proba(model_dirs[0], x, features)
    sizes = [int(n) for n in rng.integers(1, 5, 400)]
    starts = np.cumsum([0, *sizes])[:-1]

    async def scenario() -> list[tuple[int, httpx.Response]]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

            async def one(i: int) -> tuple[int, httpx.Response]:
                part = x[starts[i] : starts[i] + sizes[i]]
                body = {"instances": instances_of(part, features, as_objects=i % 2 == 1)}
                return i, await client.post(PATH, json=body)

            return await asyncio.gather(*(one(i) for i in range(len(sizes))))

    with served(app) as base:
        results = asyncio.run(scenario())
    for i, response in results:
        assert response.status_code == 200, response.text
        got = [p["probability"] for p in response.json()["predictions"]]
        assert same(got, want[starts[i] : starts[i] + sizes[i]]), f"request {i}"
    (batcher,) = app.state.batchers
    assert batcher.batches < len(sizes), "no two requests were ever predicted together"
    assert batcher.largest > 1


def test_a_bad_request_in_a_batch_gets_its_own_400(
    model_dirs: list[Path], rows: pd.DataFrame, features: list[str], tmp_path: Path
) -> None:
    registry = MemoryRegistry()
    registry.add("rainfall", "3", model_dirs[2], champion=True)  # version 1 behind a gate
    store = make_store(registry, tmp_path)
    app = create_app(SETTINGS, store, parallel_predicts=1)  # one predict at a time: held
    x = rows[features].to_numpy(dtype=np.float64)[:6]
    want = proba(model_dirs[0], x, features)
    entered, release = threading.Event(), threading.Event()

    async def scenario() -> None:
        GATES["v3"] = (entered, release)  # now that the warm-up prediction is done
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            first = asyncio.create_task(client.post(PATH, json={"instances": [x[0].tolist()]}))
            assert await asyncio.to_thread(entered.wait, 30), "the first predict did not start"
            loaded = store.current("rainfall")
            assert loaded is not None
            batcher = app.state.batchers(loaded)
            good = [
                asyncio.create_task(
                    client.post(PATH, json={"instances": instances_of(x[i : i + 1], features,
                                                                      as_objects=i % 2 == 0)})
                )
                for i in range(1, 6)
            ]  # fmt: skip
            bad = await client.post(PATH, json={"instances": [x[0].tolist()[:5]]})
            # The bad request is answered while the good ones wait behind the held predict.
            assert bad.status_code == 400
            assert "instances[0]: expected 8 feature values" in bad.json()["error"]["message"]
            for _ in range(3000):
                if batcher.queued == 5:
                    break
                await asyncio.sleep(0.01)
            assert batcher.queued == 5
            assert not any(task.done() for task in good)
            release.set()
            answers = [await first, *[await task for task in good]]
            for i, response in enumerate(answers):
                assert response.status_code == 200, response.text
                assert same([response.json()["predictions"][0]["probability"]], [want[i]])
            assert (batcher.batches, batcher.largest) == (2, 5)  # the five in one call

    try:
        with served(app) as base:
            asyncio.run(scenario())
    finally:
        release.set()
        GATES.pop("v3", None)


def test_a_swap_under_concurrent_load_loses_no_request(
    model_dirs: list[Path], rows: pd.DataFrame, features: list[str], tmp_path: Path
) -> None:
    registry = MemoryRegistry()
    registry.add("rainfall", "1", model_dirs[0], champion=True)
    registry.add("rainfall", "2", model_dirs[1])
    store = make_store(registry, tmp_path)
    app = create_app(SETTINGS, store)
    x = rows[features].to_numpy(dtype=np.float64)
    want = {"1": proba(model_dirs[0], x, features), "2": proba(model_dirs[1], x, features)}
    assert want["1"] != want["2"]
    seen: dict[int, list[str]] = {}
    failures: list[str] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        after_swap = [0]
        swapped = asyncio.Event()

        async def client_loop(c: int, client: httpx.AsyncClient) -> None:
            chooser = np.random.default_rng(c)
            versions = seen.setdefault(c, [])
            while not stop.is_set():
                start = int(chooser.integers(len(x) - 3))
                count = int(chooser.integers(1, 4))
                body = {"instances": instances_of(x[start : start + count], features, c % 2 == 0)}
                response = await client.post(PATH, json=body)
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                answer = response.json()
                version = answer["modelVersionId"]
                got = [p["probability"] for p in answer["predictions"]]
                if not same(got, want[version][start : start + count]):
                    failures.append(f"client {c}: version {version} with another's predictions")
                versions.append(version)
                if swapped.is_set():
                    after_swap[0] += 1
                    if after_swap[0] >= 400:
                        stop.set()

        async with httpx.AsyncClient(
            base_url=base, limits=httpx.Limits(max_connections=16), timeout=60
        ) as client:
            tasks = [asyncio.create_task(client_loop(c, client)) for c in range(16)]
            while sum(map(len, seen.values())) < 300 and not failures:
                await asyncio.sleep(0.01)
            registry.champions["rainfall"] = "2"
            assert await asyncio.to_thread(store.refresh, "rainfall")
            swapped.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

    with served(app) as base:
        asyncio.run(scenario())
    assert failures == []
    for c, versions in seen.items():
        assert "2" in versions, f"client {c} never saw the new champion"
        first_two = versions.index("2")
        assert set(versions[first_two:]) == {"2"}, f"client {c} went back to version 1"
    assert max(b.largest for b in app.state.batchers) > 1, "batching never happened"


# -- large batches in predict processes ---------------------------------------------------

LARGE = max(PROCESS_MIN_ROWS, 600)


def version(model_dir: Path, number: str) -> LoadedModel:
    return load_model(ModelVersion("rainfall", number, f"gs://models/{number}"), model_dir)


def matrix(rows: pd.DataFrame, features: list[str], count: int) -> npt.NDArray[np.float64]:
    x = rows[features].to_numpy(dtype=np.float64)
    return np.ascontiguousarray(np.resize(x, (count, x.shape[1])))


def ready(processes: PredictProcesses) -> None:
    assert wait_until(lambda: processes.ready, timeout=120, interval=0.05), "never started"


def test_large_batches_predict_in_processes_with_each_requests_own_version(
    model_dirs: list[Path], rows: pd.DataFrame, features: list[str]
) -> None:
    v1, v2 = version(model_dirs[0], "1"), version(model_dirs[1], "2")
    x = matrix(rows, features, 2 * PROCESS_MIN_ROWS + 7)  # split between the two, in order
    processes = PredictProcesses(2)
    batchers = Batchers(predict_threads(2), window=0.0, parallel=2, processes=processes)
    try:

        async def by_process() -> npt.NDArray[np.float64]:
            got = await processes.probabilities(v1, x)
            assert got is not None
            return got

        async def scenario() -> list[npt.NDArray[np.float64]]:
            # Before the processes have started: the thread answers, and starts them.
            first = await batchers.probabilities(v1, x)
            assert processes.batches == 0
            await asyncio.to_thread(ready, processes)
            assert set(processes.pids).isdisjoint({os.getpid()})
            # Alternating versions, concurrently: every process serves both.
            calls = [batchers.probabilities(v1 if i % 2 else v2, x) for i in range(8)]
            answers = await asyncio.gather(*calls)
            # Alone, a batch is split between the idle processes; a second one that comes
            # while both are busy stays whole.
            parts = processes.parts
            answers.append(await by_process())
            alone, parts = processes.parts - parts, processes.parts
            answers += await asyncio.gather(by_process(), by_process())
            assert (alone, processes.parts - parts) == (2, 3)
            return [first, *answers]

        first, *answers = asyncio.run(scenario())
    finally:
        processes.close()
    assert first.tolist() == v1.probabilities(x).tolist()
    assert processes.batches >= 1, "no batch went to a predict process"
    want = {1: v1.probabilities(x).tolist(), 0: v2.probabilities(x).tolist()}
    assert want[0] != want[1]
    for i, got in enumerate(answers[:8]):
        assert got.tolist() == want[i % 2], f"call {i}"
    for got in answers[8:]:
        assert got.tolist() == want[1]


def test_a_killed_predict_process_is_replaced_and_no_batch_fails(
    model_dirs: list[Path], rows: pd.DataFrame, features: list[str]
) -> None:
    v1 = version(model_dirs[0], "1")
    x = matrix(rows, features, LARGE)
    want = v1.probabilities(x).tolist()
    processes = PredictProcesses(1)
    batcher = Batcher(predict_threads(1), window=0.0, processes=processes)
    try:
        processes.start()
        ready(processes)
        (pid,) = processes.pids
        os.kill(pid, signal.SIGKILL)

        async def one() -> list[float]:
            got: list[float] = (await batcher.probabilities(v1, x)).tolist()
            return got

        assert asyncio.run(one()) == want  # the pool is found broken: a thread answers
        assert wait_until(lambda: processes.restarts == 1, timeout=30, interval=0.05)
        ready(processes)
        assert processes.pids != [pid]
        before = processes.batches
        assert asyncio.run(one()) == want
        assert processes.batches == before + 1
    finally:
        processes.close()


def test_small_batches_and_folderless_models_stay_on_threads(
    model_dirs: list[Path], rows: pd.DataFrame, features: list[str]
) -> None:
    v1 = version(model_dirs[0], "1")
    bare = LoadedModel(v1.version, v1.estimator, v1.features, v1.label, v1.classes,
                       v1.allow_nan, datetime.now(UTC))  # fmt: skip
    processes = PredictProcesses(1)
    batcher = Batcher(predict_threads(1), window=0.0, processes=processes)
    small, large = matrix(rows, features, PROCESS_MIN_ROWS - 1), matrix(rows, features, LARGE)

    async def scenario() -> None:
        got = await batcher.probabilities(v1, small)
        assert got.tolist() == v1.probabilities(small).tolist()
        got = await batcher.probabilities(bare, large)
        assert got.tolist() == v1.probabilities(large).tolist()

    try:
        asyncio.run(scenario())
        assert processes.pids == []
        assert processes.batches == 0
    finally:
        processes.close()


def test_a_large_request_is_answered_by_a_predict_process_over_http(
    model_dirs: list[Path], rows: pd.DataFrame, features: list[str], tmp_path: Path
) -> None:
    registry = MemoryRegistry()
    registry.add("rainfall", "1", model_dirs[0], champion=True)
    app = create_app(SETTINGS, make_store(registry, tmp_path))
    x = matrix(rows, features, LARGE)
    want = proba(model_dirs[0], x, features)
    body = {"instances": x.tolist()}
    with served(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        first = client.post(PATH, json=body)  # starts the processes; a thread answers
        processes = app.state.batchers.processes
        ready(processes)
        second = client.post(PATH, json=body)
    for response in (first, second):
        assert response.status_code == 200, response.text
        assert [p["probability"] for p in response.json()["predictions"]] == want
    assert processes.batches == 1
    assert processes.pids == []  # stopped with the app


OWNER = """
import sys, time
from serving.predict_processes import PredictProcesses
processes = PredictProcesses(2)
processes.start()
deadline = time.monotonic() + 120
while not processes.ready and time.monotonic() < deadline:
    time.sleep(0.05)
print(*processes.pids, flush=True)
time.sleep(600)
"""


def test_predict_processes_exit_when_their_server_is_killed() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            pids = [int(p) for p in owner.stdout.readline().split()]
            assert len(pids) == 2, pids
            assert all(psutil.pid_exists(pid) for pid in pids)
        finally:
            owner.kill()  # kill -9: the pool is never shut down
            owner.wait(30)

    def gone() -> bool:
        return not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            for pid in pids
        )

    assert wait_until(gone, timeout=30, interval=0.05), "predict processes outlived the server"
