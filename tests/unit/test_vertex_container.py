"""The Vertex AI custom container (``serving.vertex_container``) on a model folder trained here."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from starlette.exceptions import StarletteDeprecationWarning
from threadpoolctl import threadpool_info

from components.train import train
from retrain.config import Settings
from retrain.gatekeeper.registry import CanaryState, ModelVersion
from retrain.localstack.processes import http_ok, spawn, stop, wait_until
from serving.app import create_app as create_prediction_server
from serving.models import ModelStore
from serving.vertex_container import ContainerSettings, create_app, serve
from tests.conftest import QUICK_MODEL, ROOT, free_ports, rainfall

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 but works with httpx; the warning is about packaging only.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.unit

PROJECT, REGION = "retrain-test", "us-central1"
SETTINGS = Settings.model_validate(
    {
        "project": PROJECT,
        "region": REGION,
        "buckets": {"data": "test-data", "artifacts": "test-artifacts"},
        "models": {"rainfall": QUICK_MODEL},
    }
)
SERVER_PREDICT = f"/v1/projects/{PROJECT}/locations/{REGION}/endpoints/rainfall:predict"
GS_URI = "gs://vertex-tenant/model/artifacts"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    data: pd.DataFrame = rainfall(700)
    return data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, frame: pd.DataFrame) -> Path:
    """A model folder written by the train component's core, as a pipeline run writes it."""
    root = tmp_path_factory.mktemp("vertex-model")
    data = root / "train.parquet"
    frame.iloc[:600].to_parquet(data)
    return train(data, SETTINGS.models["rainfall"], root / "model").model_path.parent


@pytest.fixture(scope="module")
def features(model_dir: Path) -> list[str]:
    names: list[str] = json.loads((model_dir / "metadata.json").read_text())["features"]
    return names


@pytest.fixture(scope="module")
def rows(frame: pd.DataFrame, features: list[str]) -> list[list[float]]:
    """100 held-out instances (more than the inline limit: the threadpool path too)."""
    values: list[list[float]] = frame[features].iloc[600:700].astype(float).to_numpy().tolist()
    return values


class OneVersion:
    """A ModelRegistry whose champion is the one folder."""

    def __init__(self, folder: Path) -> None:
        self.record = ModelVersion("rainfall", "1", str(folder))

    def champion(self, model: str) -> ModelVersion | None:
        return self.record if model == "rainfall" else None

    def version(self, model: str, version: str) -> ModelVersion | None:
        return self.record if (model, version) == ("rainfall", "1") else None

    def canary(self, model: str) -> CanaryState | None:
        return None  # never a canary


def copy_folder(uri: str, local: Path) -> object:
    return shutil.copytree(uri, local, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def server_predictions(
    model_dir: Path, rows: list[list[float]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[list[Any]], list[dict[str, Any]]]]:
    """What the local prediction server (``python -m serving``) answers for instances."""
    store = ModelStore(
        ["rainfall"], OneVersion(model_dir), copy_folder, tmp_path_factory.mktemp("cache")
    )
    with TestClient(create_prediction_server(SETTINGS, store)) as client:

        def predictions(instances: list[Any]) -> list[dict[str, Any]]:
            response = client.post(SERVER_PREDICT, json={"instances": instances})
            assert response.status_code == 200, response.text
            found: list[dict[str, Any]] = response.json()["predictions"]
            return found

        yield predictions


def wait_healthy(client: TestClient, route: str = "/health") -> None:
    assert wait_until(lambda: client.get(route).status_code != 503, timeout=10, interval=0.02)


@pytest.fixture(scope="module")
def container(model_dir: Path) -> Iterator[TestClient]:
    """The container on a local folder, with the default routes, loaded."""
    with TestClient(create_app(ContainerSettings(storage_uri=str(model_dir)))) as client:
        wait_healthy(client)
        yield client


def assert_error(response: Any, code: int, *fragments: str) -> str:
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["status"] == {400: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}.get(
        code, error["status"]
    )
    message: str = error["message"]
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- health and loading ----------------------------------------------------------------------


def test_health_is_503_while_the_gs_folder_loads_then_200(model_dir: Path) -> None:
    release = threading.Event()
    calls: list[tuple[str, Path]] = []

    def download(uri: str, local: Path) -> object:
        calls.append((uri, local))
        assert release.wait(10)
        return copy_folder(str(model_dir), local)

    settings = ContainerSettings(storage_uri=GS_URI, model="rainfall", version="7")
    with TestClient(create_app(settings, download=download)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading"
        assert_error(client.post("/predict", json={"instances": [[0] * 8]}), 503, "still loading")

        release.set()
        wait_healthy(client)
        ready = client.get("/health")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "model": "rainfall",
            "version": "7",
            "storageUri": GS_URI,
        }
        assert client.post("/predict", json={"instances": [[0] * 8]}).status_code == 200
    # downloaded once, from AIP_STORAGE_URI, into a fresh local folder
    assert [uri for uri, _ in calls] == [GS_URI]
    assert (calls[0][1] / "model.joblib").is_file()


def test_a_folder_that_cannot_load_stays_unhealthy_and_reports_it(tmp_path: Path) -> None:
    failures: list[BaseException] = []
    settings = ContainerSettings(storage_uri=str(tmp_path), model="rainfall", version="3")
    with TestClient(create_app(settings, on_failure=failures.append)) as client:
        assert wait_until(lambda: bool(failures), timeout=10, interval=0.02)
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        assert "rainfall version 3" in health.json()["error"]
        assert "metadata.json is missing" in health.json()["error"]
        assert_error(
            client.post("/predict", json={"instances": [[0] * 8]}),
            503,
            "could not be loaded",
            "metadata.json is missing",
        )


def test_a_download_that_fails_names_the_uri(tmp_path: Path) -> None:
    def download(uri: str, local: Path) -> object:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")

    failures: list[BaseException] = []
    settings = ContainerSettings(storage_uri=GS_URI)
    with TestClient(create_app(settings, download=download, on_failure=failures.append)) as client:
        assert wait_until(lambda: bool(failures), timeout=10, interval=0.02)
        error = client.get("/health").json()["error"]
    assert f"cannot download {GS_URI}" in error
    assert "no objects under this prefix" in error


def test_serve_exits_1_when_the_model_cannot_load(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    settings = ContainerSettings(storage_uri=str(tmp_path), host="127.0.0.1", port=port)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(serve(settings)), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert codes == [1]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"storage_uri": ""}, "AIP_STORAGE_URI is empty"),
        ({"storage_uri": "s3://bucket/model"}, "expected a gs:// URI or a local folder"),
        ({"health_route": "health"}, "AIP_HEALTH_ROUTE must be a path"),
        ({"predict_route": "predict"}, "AIP_PREDICT_ROUTE must be a path"),
        ({"predict_route": "/health"}, "are both '/health'"),
        ({"port": 0}, "AIP_HTTP_PORT must be 1-65535"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(
    fields: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValueError, match="AIP_") as caught:
        ContainerSettings(**{"storage_uri": "/model", **fields})
    assert fragment in str(caught.value)


# -- predictions -----------------------------------------------------------------------------


def test_predictions_equal_the_prediction_servers(
    container: TestClient,
    server_predictions: Callable[[list[Any]], list[dict[str, Any]]],
    model_dir: Path,
    rows: list[list[float]],
    features: list[str],
) -> None:
    for instances in (rows[:5], rows):  # inline, and through the threadpool
        response = container.post("/predict", json={"instances": instances})
        assert response.status_code == 200, response.text
        assert response.json() == {"predictions": server_predictions(instances)}

    objects = [dict(zip(reversed(features), reversed(row), strict=True)) for row in rows[:5]]
    response = container.post("/predict", json={"instances": objects, "parameters": {}})
    assert response.json() == {"predictions": server_predictions(rows[:5])}

    # and both are the estimator's own predict_proba
    estimator = joblib.load(model_dir / "model.joblib")
    proba = estimator.predict_proba(pd.DataFrame(rows[:5], columns=features))[:, 1].tolist()
    got = [p["probability"] for p in response.json()["predictions"]]
    assert got == pytest.approx(proba, abs=1e-12)
    assert {p["label"] for p in response.json()["predictions"]} <= set(estimator.classes_.tolist())


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"instances": [[0] * 7]}, ["instances[0]", "expected 8 feature values", "got 7"]),
        ({"instances": [[0] * 7 + ["wet"]]}, ["instances[0], feature", "got a string"]),
        ({"instances": [{"nope": 1}]}, ["instances[0]", "unknown feature 'nope'"]),
        ({"instances": []}, ['"instances" is empty']),
        ({"instance": [[0] * 8]}, ['no "instances" field']),
        ({"instances": {"a": 1}}, ['"instances" must be a list']),
        ({"instances": [[0] * 8], "parameters": 3}, ['"parameters" must be an object']),
        ({"instances": [[0] * 8], "extra": 1}, ["unknown field 'extra'"]),
        ([1, 2], ["must be a JSON object"]),
    ],
)
def test_a_bad_body_is_400_naming_the_problem(
    container: TestClient, body: Any, fragments: list[str]
) -> None:
    assert_error(container.post("/predict", json=body), 400, *fragments)


# OpenMP's thread count in the thread that ran each predict_proba (picklable: no state).
OPENMP_THREADS: list[int] = []


class OpenMPProbe:
    classes_ = np.array(["dry", "wet"])

    def predict_proba(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        OPENMP_THREADS.extend(
            i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"
        )
        return np.column_stack([np.full(len(x), 0.5), np.full(len(x), 0.5)])


def test_a_large_request_predicts_on_one_openmp_thread(tmp_path: Path) -> None:
    """Over the inline limit, predict runs on a threadpool thread, which OpenMP does not give
    the event loop thread's limit; the container sets it there."""
    joblib.dump(OpenMPProbe(), tmp_path / "model.joblib")
    (tmp_path / "metadata.json").write_text(json.dumps({"features": ["a", "b"], "label": "y"}))
    with TestClient(create_app(ContainerSettings(storage_uri=str(tmp_path)))) as client:
        wait_healthy(client)
        OPENMP_THREADS.clear()
        response = client.post("/predict", json={"instances": [[1.0, 2.0]] * 100})
    assert response.status_code == 200, response.text
    assert OPENMP_THREADS
    assert set(OPENMP_THREADS) == {1}


def test_not_json_is_400(container: TestClient) -> None:
    assert_error(container.post("/predict", content=b"{nope"), 400, "not valid JSON")


def test_other_paths_and_methods_are_404_and_405(container: TestClient) -> None:
    assert_error(container.post("/v1/predict", json={"instances": [[0] * 8]}), 404, "/v1/predict")
    assert_error(container.get("/predict"), 405, "GET is not allowed on /predict")


# -- the module, as the image runs it --------------------------------------------------------


def request(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_the_module_honours_the_aip_port_and_routes(
    model_dir: Path,
    rows: list[list[float]],
    server_predictions: Callable[[list[Any]], list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    """``python -m serving.vertex_container`` with Vertex AI's default (per-endpoint) routes."""
    (port,) = free_ports(1)
    base = "/v1/endpoints/123/deployedModels/456"
    env = {
        "AIP_STORAGE_URI": str(model_dir),
        "AIP_HTTP_PORT": str(port),
        "AIP_HEALTH_ROUTE": base,
        "AIP_PREDICT_ROUTE": base + ":predict",
        "SERVING_HOST": "127.0.0.1",
        "RETRAIN_MODEL": "rainfall",
        "RETRAIN_MODEL_VERSION": "4",
    }
    started = time.monotonic()
    record = spawn(
        [sys.executable, "-m", "serving.vertex_container"], tmp_path / "container.log", env, ROOT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        healthy = wait_until(
            lambda: http_ok(url + base, lambda status, _: status == 200),
            timeout=30,
            abort=lambda: not record.alive(),
        )
        log = (tmp_path / "container.log").read_text()
        assert healthy, log
        assert time.monotonic() - started < 15, log

        status, health = request(url + base)
        assert (status, health["model"], health["version"]) == (200, "rainfall", "4")
        status, body = request(url + base + ":predict", {"instances": rows[:3]})
        assert status == 200
        assert body == {"predictions": server_predictions(rows[:3])}
        status, error = request(url + base + ":predict", {"instances": "x"})
        assert status == 400
        assert '"instances" must be a list' in error["error"]["message"]
        assert request(url + "/health")[0] == 404  # the defaults are not served
        assert request(url + "/predict", {"instances": rows[:1]})[0] == 404
    finally:
        stop(record)
