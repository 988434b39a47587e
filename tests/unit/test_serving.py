"""The prediction server in process: real models trained on rainfall, an in-memory registry."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from google.api_core.exceptions import NotFound
from starlette.exceptions import StarletteDeprecationWarning

from components.train import train
from retrain.config import Settings
from retrain.gatekeeper.registry import CanaryState, ModelVersion
from retrain.messages import Decision, encode
from serving.app import MAX_BODY_BYTES, create_app
from serving.models import ChampionWatcher, ModelLoadError, ModelStore, load_model

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 but works with httpx; the warning is about packaging only.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[2] / "data" / "rainfall.csv.gz"
PROJECT, REGION = "retrain-test", "us-central1"
BASE = f"/v1/projects/{PROJECT}/locations/{REGION}"
PREDICT = f"{BASE}/endpoints/rainfall:predict"

SETTINGS = Settings.model_validate(
    {
        "project": PROJECT,
        "region": REGION,
        "buckets": {"data": "test-data", "artifacts": "test-artifacts"},
        "models": {
            "rainfall": {
                "data_prefix": "rainfall/",
                "label": "rain",
                "order_column": "day",
                "estimator": {
                    "name": "HistGradientBoostingClassifier",
                    "params": {"max_iter": 20},
                },
            },
            "slow": {"data_prefix": "slow/", "label": "y", "order_column": "day"},
            "empty": {"data_prefix": "empty/", "label": "y", "order_column": "day"},
        },
    }
)


class MemoryRegistry:
    """A ModelRegistry in memory: versions by (model, version), and a champion pointer."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], ModelVersion] = {}
        self.champions: dict[str, str] = {}

    def add(self, model: str, version: str, folder: Path, *, champion: bool = False) -> None:
        self.versions[(model, version)] = ModelVersion(model, version, str(folder), {}, "run")
        if champion:
            self.champions[model] = version

    def champion(self, model: str) -> ModelVersion | None:
        version = self.champions.get(model)
        return None if version is None else self.versions[(model, version)]

    def version(self, model: str, version: str) -> ModelVersion | None:
        return self.versions.get((model, version))

    def canary(self, model: str) -> CanaryState | None:
        return None  # never a canary


class CopyDownloader:
    """Copies the local folder an artifact_uri names; counts the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, uri: str, local: Path) -> object:
        self.calls.append(uri)
        return shutil.copytree(uri, local, dirs_exist_ok=True)


# A fake estimator that can be held inside predict_proba: picklable (it keeps only a key).
GATES: dict[str, tuple[threading.Event, threading.Event]] = {}


class SlowEstimator:
    def __init__(self, key: str, probability: float) -> None:
        self.key = key
        self.probability = probability
        self.classes_ = np.array(["dry", "wet"])

    def predict_proba(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        gate = GATES.get(self.key)
        if gate is not None:
            entered, release = gate
            entered.set()
            assert release.wait(10)
        p = np.full(len(x), self.probability)
        return np.column_stack([1 - p, p])


def slow_folder(directory: Path, key: str, probability: float) -> Path:
    directory.mkdir(parents=True)
    joblib.dump(SlowEstimator(key, probability), directory / "model.joblib")
    (directory / "metadata.json").write_text(json.dumps({"features": ["a", "b"], "label": "y"}))
    return directory


@pytest.fixture(scope="module")
def rainfall() -> pd.DataFrame:
    return pd.read_csv(DATA, nrows=1200).rename(columns={"Unnamed: 0": "day"})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, rainfall: pd.DataFrame) -> list[Path]:
    """Two real model folders: version 1 on rows 0-599, version 2 on rows 600-1199."""
    spec = SETTINGS.models["rainfall"]
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for i, rows in enumerate((rainfall.iloc[:600], rainfall.iloc[600:]), start=1):
        data = root / f"train-{i}.parquet"
        rows.to_parquet(data)
        dirs.append(train(data, spec, root / f"v{i}").model_path.parent)
    return dirs


@pytest.fixture
def registry(model_dirs: list[Path], tmp_path: Path) -> MemoryRegistry:
    registry = MemoryRegistry()
    registry.add("rainfall", "1", model_dirs[0], champion=True)
    registry.add("rainfall", "2", model_dirs[1])
    registry.add("slow", "1", slow_folder(tmp_path / "slow1", "slow-1", 0.25), champion=True)
    registry.add("slow", "2", slow_folder(tmp_path / "slow2", "slow-2", 0.75))
    return registry


@pytest.fixture
def downloader() -> CopyDownloader:
    return CopyDownloader()


@pytest.fixture
def store(registry: MemoryRegistry, downloader: CopyDownloader, tmp_path: Path) -> ModelStore:
    return ModelStore(SETTINGS.models, registry, downloader, tmp_path / "cache")


@pytest.fixture
def client(store: ModelStore) -> Iterator[TestClient]:
    with TestClient(create_app(SETTINGS, store)) as client:
        yield client


@pytest.fixture
def features(model_dirs: list[Path]) -> list[str]:
    features: list[str] = json.loads((model_dirs[0] / "metadata.json").read_text())["features"]
    return features


def expected(model_dir: Path, rows: pd.DataFrame) -> list[float]:
    """predict_proba of the model as trained (a fresh load, fed a DataFrame)."""
    estimator = joblib.load(model_dir / "model.joblib")
    proba: list[float] = estimator.predict_proba(rows)[:, 1].tolist()
    return proba


def assert_error(response: Any, code: int, *fragments: str) -> str:
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["status"] == {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}[code]
    message: str = error["message"]
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- predictions -------------------------------------------------------------------------


def test_list_instances_match_predict_proba(
    client: TestClient, model_dirs: list[Path], rainfall: pd.DataFrame, features: list[str]
) -> None:
    rows = rainfall[features].iloc[1000:1005]
    response = client.post(PREDICT, json={"instances": rows.to_numpy().tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deployedModelId"] == "1"
    assert body["modelVersionId"] == "1"
    assert body["model"] == f"projects/{PROJECT}/locations/{REGION}/models/rainfall"
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == pytest.approx(expected(model_dirs[0], rows), abs=1e-12)
    labels = [p["label"] for p in body["predictions"]]
    assert labels == [int(p >= 0.5) for p in probabilities]


def test_object_instances_in_any_key_order(
    client: TestClient, model_dirs: list[Path], rainfall: pd.DataFrame, features: list[str]
) -> None:
    rows = rainfall[features].iloc[900:903]
    instances = [dict(reversed(list(row.items()))) for row in rows.to_dict(orient="records")]
    body = client.post(PREDICT, json={"instances": instances, "parameters": {}}).json()
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == pytest.approx(expected(model_dirs[0], rows), abs=1e-12)


def test_many_instances_go_through_the_threadpool(
    client: TestClient, model_dirs: list[Path], rainfall: pd.DataFrame, features: list[str]
) -> None:
    rows = rainfall[features].iloc[:500]
    body = client.post(PREDICT, json={"instances": rows.to_numpy().tolist()}).json()
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == pytest.approx(expected(model_dirs[0], rows), abs=1e-12)


def test_null_is_a_missing_value_for_an_estimator_that_accepts_them(
    client: TestClient, features: list[str]
) -> None:
    row: list[float | None] = [0.0] * len(features)
    row[2] = None
    response = client.post(PREDICT, json={"instances": [row]})
    assert response.status_code == 200, response.text


def test_estimator_fitted_on_a_dataframe_is_served_from_arrays(
    model_dirs: list[Path],
) -> None:
    loaded = load_model(ModelVersion("rainfall", "1", "x"), model_dirs[0])
    assert not loaded.needs_frame  # the feature names were dropped once, at load time
    assert not hasattr(loaded.estimator, "feature_names_in_")


def test_metadata_that_disagrees_with_the_estimator_is_refused(
    model_dirs: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(model_dirs[0], folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["features"] = list(reversed(metadata["features"]))
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="fitted on columns"):
        load_model(ModelVersion("rainfall", "9", "x"), folder)


# -- bad requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"instances": [[1.0, 2.0]]}, ["instances[0]", "expected 8 feature values", "got 2"]),
        ({"instances": [{"temperature": 1, "humidity": 2}]}, ["unknown feature 'humidity'"]),
        ({"instances": [{"temperature": 1}]}, ["instances[0]", "missing feature 'dew point'"]),
        ({"instances": [[0] * 8, [0] * 7 + ["x"]]}, ["instances[1]", "'rain'", "a string"]),
        ({"instances": [[0] * 7 + [True]]}, ["instances[0]", "a boolean"]),
        ({"instances": [[0] * 7 + [[1]]]}, ["instances[0]", "a list"]),
        ({"instances": [[0] * 7 + [10**400]]}, ["instances[0]", "too large"]),
        ({"instances": ["abc"]}, ["instances[0]", "got a string"]),
        ({"instances": []}, ["empty"]),
        ({"instance": [[0] * 8]}, ['no "instances"']),
        ({"instances": {"a": 1}}, ['"instances" must be a list']),
        ({"instances": [[0] * 8], "parameters": 3}, ['"parameters" must be an object']),
        ({"instances": [[0] * 8], "extra": 1}, ["unknown field 'extra'"]),
        ([1, 2], ["must be a JSON object"]),
    ],
)
def test_bad_instances_are_400_naming_the_problem(
    client: TestClient, body: Any, fragments: list[str], features: list[str]
) -> None:
    fragments = [f.replace("'rain'", repr(features[7])) for f in fragments]
    assert_error(client.post(PREDICT, json=body), 400, *fragments)


def test_not_json_is_400(client: TestClient) -> None:
    assert_error(client.post(PREDICT, content=b"{nope"), 400, "not valid JSON")
    nan = b'{"instances": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}'
    assert_error(client.post(PREDICT, content=nan), 400, "NaN is not valid JSON")
    assert_error(client.post(PREDICT, content=b"\xff\xfe"), 400, "not valid JSON")


def test_body_over_the_limit_is_400(client: TestClient) -> None:
    big = b'{"instances": [' + b"0," * MAX_BODY_BYTES + b"0]}"
    assert_error(client.post(PREDICT, content=big), 400, "over the 1500000-byte limit", "bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as read
        yield b'{"instances": ['
        for _ in range(20):
            yield b"0," * 50_000
        yield b"0]}"

    message = assert_error(client.post(PREDICT, content=chunks()), 400, "so far")
    assert "over the 1500000-byte limit" in message


# -- not found -------------------------------------------------------------------------------


def test_unknown_model_version_scope_and_path_are_404(client: TestClient) -> None:
    body = {"instances": [[0] * 8]}
    assert_error(client.post(f"{BASE}/endpoints/nope:predict", json=body), 404, "'nope'")
    assert_error(client.get(f"{BASE}/endpoints/nope"), 404, "'nope'")
    assert_error(
        client.post(f"{BASE}/endpoints/empty:predict", json=body), 404, "no deployed model"
    )
    assert_error(client.post(f"{BASE}/models/rainfall@7:predict", json=body), 404, "version '7'")
    assert_error(client.post(f"{BASE}/models/nope@1:predict", json=body), 404, "'nope'")
    other = f"/v1/projects/other-project/locations/{REGION}/endpoints/rainfall:predict"
    assert_error(client.post(other, json=body), 404, "projects/other-project", PROJECT)
    assert_error(client.get("/v2/whatever"), 404, "no such resource")


# -- resources and routes --------------------------------------------------------------------


def test_endpoint_resource(client: TestClient) -> None:
    body = client.get(f"{BASE}/endpoints/rainfall").json()
    assert body["name"] == f"projects/{PROJECT}/locations/{REGION}/endpoints/rainfall"
    assert body["displayName"] == "rainfall"
    (deployed,) = body["deployedModels"]
    assert deployed["id"] == "1"
    assert deployed["modelVersionId"] == "1"
    assert deployed["model"] == f"projects/{PROJECT}/locations/{REGION}/models/rainfall"
    assert deployed["createTime"].endswith("Z")
    assert body["trafficSplit"] == {"1": 100}
    empty = client.get(f"{BASE}/endpoints/empty").json()
    assert empty["deployedModels"] == []
    assert empty["trafficSplit"] == {}


def test_healthz_names_the_versions_served(client: TestClient) -> None:
    assert client.get("/healthz").json() == {
        "status": "ok",
        "models": {"rainfall": "1", "slow": "1", "empty": None},
    }


def test_version_pinned_route(
    client: TestClient,
    store: ModelStore,
    downloader: CopyDownloader,
    model_dirs: list[Path],
    rainfall: pd.DataFrame,
    features: list[str],
) -> None:
    rows = rainfall[features].iloc[1100:1103]
    instances = rows.to_numpy().tolist()
    for _ in range(2):
        response = client.post(f"{BASE}/models/rainfall@2:predict", json={"instances": instances})
        body = response.json()
        assert body["modelVersionId"] == "2"
        assert body["deployedModelId"] == "2"
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == pytest.approx(expected(model_dirs[1], rows), abs=1e-12)
    assert downloader.calls.count(str(model_dirs[1])) == 1  # loaded once, then cached
    # The champion through the pinned route is the same object.
    assert store.pinned("rainfall", "1") is store.current("rainfall")


def test_pinned_versions_are_bounded(
    registry: MemoryRegistry, downloader: CopyDownloader, model_dirs: list[Path], tmp_path: Path
) -> None:
    for v in range(3, 9):
        registry.add("rainfall", str(v), model_dirs[v % 2])
    store = ModelStore(["rainfall"], registry, downloader, tmp_path / "c", pinned_capacity=2)
    for v in range(3, 9):
        assert store.pinned("rainfall", str(v)) is not None
    assert store.cached_pinned("rainfall", "8") is not None
    assert store.cached_pinned("rainfall", "7") is not None
    assert store.cached_pinned("rainfall", "6") is None


# -- swapping ----------------------------------------------------------------------------------


def test_refresh_swaps_to_the_new_champion_once(
    client: TestClient, store: ModelStore, registry: MemoryRegistry, downloader: CopyDownloader
) -> None:
    body = {"instances": [[0.1] * 8]}
    assert client.post(PREDICT, json=body).json()["modelVersionId"] == "1"
    assert store.refresh("rainfall") is False  # unchanged pointer: nothing loaded
    registry.champions["rainfall"] = "2"
    assert store.refresh("rainfall") is True
    assert client.post(PREDICT, json=body).json()["modelVersionId"] == "2"
    assert client.get("/healthz").json()["models"]["rainfall"] == "2"
    # Back to 1: the cache folder is reused, not downloaded again.
    registry.champions["rainfall"] = "1"
    assert store.refresh("rainfall") is True
    assert client.post(PREDICT, json=body).json()["modelVersionId"] == "1"
    assert len([c for c in downloader.calls if "slow" not in c]) == 2


def test_a_new_version_of_the_same_artifact_is_served_under_its_own_number(
    client: TestClient, store: ModelStore, registry: MemoryRegistry, downloader: CopyDownloader
) -> None:
    """Two versions may share one artifact (the bench registers a copy): the pointer moving
    to the other version still swaps, so the version served is the one on record."""
    body = {"instances": [[0.1] * 8]}
    assert client.post(PREDICT, json=body).json()["modelVersionId"] == "1"
    one = registry.versions[("rainfall", "1")]
    registry.add("rainfall", "9", Path(one.artifact_uri), champion=True)
    assert store.refresh("rainfall") is True
    assert client.post(PREDICT, json=body).json()["modelVersionId"] == "9"
    assert len([c for c in downloader.calls if c == one.artifact_uri]) == 1  # same folder


def test_a_request_in_flight_finishes_on_the_model_it_started_on(
    client: TestClient, store: ModelStore, registry: MemoryRegistry
) -> None:
    entered, release = threading.Event(), threading.Event()
    GATES["slow-1"] = (entered, release)
    results: list[Any] = []
    try:
        request = threading.Thread(
            target=lambda: results.append(
                client.post(f"{BASE}/endpoints/slow:predict", json={"instances": [[1, 2]]})
            )
        )
        request.start()
        assert entered.wait(10)  # the request is inside version 1's predict_proba
        registry.champions["slow"] = "2"
        assert store.refresh("slow") is True
        current = store.current("slow")
        assert current is not None
        assert current.version.version == "2"
    finally:
        release.set()
        GATES.pop("slow-1")
    request.join(10)
    (response,) = results
    body = response.json()
    assert body["modelVersionId"] == "1"
    assert body["predictions"] == [{"label": "dry", "probability": 0.25}]
    after = client.post(f"{BASE}/endpoints/slow:predict", json={"instances": [[1, 2]]}).json()
    assert after["modelVersionId"] == "2"
    assert after["predictions"] == [{"label": "wet", "probability": 0.75}]


def test_a_champion_that_cannot_load_leaves_the_old_one_serving(
    client: TestClient, store: ModelStore, registry: MemoryRegistry, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text("{}")
    registry.add("rainfall", "3", broken, champion=True)
    with pytest.raises(ModelLoadError, match="version 3"):
        store.refresh("rainfall")
    assert store.refresh_all()["rainfall"] is False
    response = client.post(PREDICT, json={"instances": [[0] * 8]})
    assert response.json()["modelVersionId"] == "1"


# -- keeping current ---------------------------------------------------------------------------


class FakeMessage:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.acked = False

    def ack(self) -> None:
        self.acked = True


def decision(model: str, version: str = "2") -> bytes:
    return encode(
        Decision(
            model=model, run_id="r", verdict="promoted", reasons=["better"], new_version=version
        )
    )


def test_a_decision_refreshes_its_model_then_acks(
    store: ModelStore, registry: MemoryRegistry
) -> None:
    store.refresh_all()
    watcher = ChampionWatcher(store, PROJECT, None, poll_seconds=None)
    registry.champions["rainfall"] = "2"
    for data in (decision("rainfall"), decision("not-served"), b"not a decision"):
        message = FakeMessage(data)
        watcher.on_message(message)
        assert message.acked
    assert store.versions()["rainfall"] == "2"


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_without_the_subscription_the_poller_keeps_the_store_current(
    store: ModelStore, registry: MemoryRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    class MissingSubscription:
        closed = False

        def subscription_path(self, project: str, name: str) -> str:
            return f"projects/{project}/subscriptions/{name}"

        def get_subscription(self, **_: Any) -> None:
            raise NotFound("no such subscription")

        def close(self) -> None:
            self.closed = True

    watcher = ChampionWatcher(
        store,
        PROJECT,
        "model-decisions-serving",
        poll_seconds=0.05,
        subscriber_factory=MissingSubscription,
    )
    caplog.set_level(logging.WARNING, logger="serving.models")
    with TestClient(create_app(SETTINGS, store, watcher=watcher)) as client:
        assert client.get("/healthz").json()["models"]["rainfall"] == "1"
        assert watcher.running()
        registry.champions["rainfall"] = "2"
        assert wait_for(lambda: client.get("/healthz").json()["models"]["rainfall"] == "2")
    assert not watcher.running()
    warnings = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(warnings) == 1
