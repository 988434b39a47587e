"""The fast parsing path of the prediction server: the same matrices and the same 400s as the
checked, value-by-value path; orjson in and out; the body limit as a setting."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from components.train import train
from retrain.gatekeeper.registry import ModelVersion
from serving.__main__ import DEFAULT_MAX_BODY_BYTES
from serving.app import create_app
from serving.models import InstanceError, LoadedModel, ModelStore, load_model
from tests.unit.test_serving import (
    DATA,
    PREDICT,
    SETTINGS,
    CopyDownloader,
    MemoryRegistry,
    assert_error,
    expected,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.unit

FEATURES = ("a", "b", "c")


def model(*, allow_nan: bool = True) -> LoadedModel:
    """A LoadedModel for matrix building only (no estimator is called)."""
    return LoadedModel(
        version=ModelVersion("m", "1", "x"),
        estimator=None,
        features=FEATURES,
        label="y",
        classes=(0, 1),
        allow_nan=allow_nan,
        loaded_at=None,  # type: ignore[arg-type]
    )


def both(loaded: LoadedModel, instances: list[Any]) -> tuple[Any, Any]:
    """(fast result or error message, checked result or error message)."""
    results: list[Any] = []
    for build in (loaded.matrix, loaded._checked_matrix):
        try:
            results.append(build(instances))
        except InstanceError as exc:
            results.append(str(exc))
    return results[0], results[1]


@pytest.mark.parametrize(
    "instances",
    [
        [[1, 2.5, -3e-300]],
        [[0.1, 0.2, 0.30000000000000004], [1e308, -1e308, 5e-324]],
        [{"c": 3, "a": 1, "b": 2}, {"a": 0.5, "b": None, "c": 7}],
        [[None, 1, 2]],
        # float32 values (as a float32 client sends them) and full float64 precision
        np.array([[0.1, 1 / 3, 1e-20]], dtype=np.float32).astype(np.float64).tolist(),
        [[math.pi, math.e, 2**53 + 1]],
        [[10**30, 2**64, -(2**70)]],
    ],
)
def test_the_fast_path_builds_what_the_checked_path_builds(instances: list[Any]) -> None:
    loaded = model()
    assert loaded._fast_matrix(instances) is not None
    fast, checked = both(loaded, instances)
    np.testing.assert_array_equal(fast, checked)
    assert fast.dtype == np.float64
    assert fast.shape == (len(instances), len(FEATURES))


@pytest.mark.parametrize(
    ("instances", "allow_nan"),
    [
        ([[1, 2]], True),
        ([[1, 2, 3], [1, 2]], True),
        ([[1, 2, "3"]], True),
        ([[1, True, 3]], True),
        ([[1, [2], 3]], True),
        ([[1, {"x": 2}, 3]], True),
        ([[1, None, 3]], False),
        ([[1, 10**400, 3]], True),
        ([[1, float("inf"), 3]], True),
        ([[1, 2, 3], {"a": 1, "b": 2, "c": 3}], True),  # mixed kinds: checked path, valid
        ([{"a": 1, "b": 2}], True),
        ([{"a": 1, "b": 2, "d": 3}], True),
        ([{"a": 1, "b": 2, "c": 3, "d": 4}], True),
        ([{"a": 1, "b": 2, "c": "x"}], True),
        (["abc"], True),
        ([[1, 2, 3], 4], True),
    ],
)
def test_bad_instances_get_the_checked_paths_message(instances: list[Any], allow_nan: bool) -> None:
    fast, checked = both(model(allow_nan=allow_nan), instances)
    if isinstance(checked, str):
        assert fast == checked
        assert checked.startswith("instances[")
    else:
        np.testing.assert_array_equal(fast, checked)


def test_one_feature_objects(tmp_path: Path) -> None:
    loaded = LoadedModel(
        version=ModelVersion("m", "1", "x"),
        estimator=None,
        features=("only",),
        label="y",
        classes=(0, 1),
        allow_nan=False,
        loaded_at=None,  # type: ignore[arg-type]
    )
    np.testing.assert_array_equal(loaded.matrix([{"only": 2}, {"only": 3.5}]), [[2.0], [3.5]])
    assert "'other'" in both(loaded, [{"other": 1}])[0]


# -- over HTTP, with a real model --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model folder, trained on 600 rainfall rows."""
    rows = pd.read_csv(DATA, nrows=600).rename(columns={"Unnamed: 0": "day"})
    root = tmp_path_factory.mktemp("fast-path")
    rows.to_parquet(root / "train.parquet")
    return train(root / "train.parquet", SETTINGS.models["rainfall"], root / "v1").model_path.parent


@pytest.fixture
def features(model_dir: Path) -> list[str]:
    names: list[str] = json.loads((model_dir / "metadata.json").read_text())["features"]
    return names


def store(model_dir: Path, tmp_path: Path) -> ModelStore:
    registry = MemoryRegistry()
    registry.add("rainfall", "1", model_dir, champion=True)
    return ModelStore(["rainfall"], registry, CopyDownloader(), tmp_path / "cache")


@pytest.fixture
def big_client(model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(SETTINGS, store(model_dir, tmp_path), max_body_bytes=DEFAULT_MAX_BODY_BYTES)
    with TestClient(app) as client:
        yield client


def test_ten_thousand_full_precision_rows_fit_the_default_limit(
    big_client: TestClient, model_dir: Path, features: list[str]
) -> None:
    rng = np.random.default_rng(16)
    x = rng.normal(loc=10.0, scale=5.0, size=(10_000, len(features)))
    for instances in (x.tolist(), [dict(zip(features, row, strict=True)) for row in x.tolist()]):
        body = json.dumps({"instances": instances}).encode()
        assert 1_500_000 < len(body) < DEFAULT_MAX_BODY_BYTES
        response = big_client.post(PREDICT, content=body)
        assert response.status_code == 200, response.text[:300]
        assert response.headers["content-type"] == "application/json"
        probabilities = [p["probability"] for p in response.json()["predictions"]]
        want = load_model(ModelVersion("rainfall", "1", "x"), model_dir).estimator
        assert probabilities == want.predict_proba(x)[:, 1].tolist()  # exactly, through JSON


def test_the_limit_is_a_setting(model_dir: Path, tmp_path: Path) -> None:
    served = store(model_dir, tmp_path)
    with TestClient(create_app(SETTINGS, served, max_body_bytes=100)) as client:
        assert client.post(PREDICT, json={"instances": [[0] * 8]}).status_code == 200
        assert_error(
            client.post(PREDICT, json={"instances": [[0.123456789] * 8] * 2}),
            400,
            "over the 100-byte limit",
        )
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(SETTINGS, served, max_body_bytes=0)


def test_responses_keep_vertex_ais_shape(
    big_client: TestClient, model_dir: Path, features: list[str]
) -> None:
    rows = [[0.5] * len(features), [30.0] * len(features)]
    response = big_client.post(PREDICT, json={"instances": rows})
    body = response.json()
    assert list(body) == ["predictions", "deployedModelId", "model", "modelVersionId"]
    assert [list(p) for p in body["predictions"]] == [["label", "probability"]] * 2
    assert [p["probability"] for p in body["predictions"]] == pytest.approx(
        expected(model_dir, pd.DataFrame(rows, columns=features)), abs=1e-15
    )
    # orjson writes the compact form Starlette's JSONResponse wrote
    assert response.content == json.dumps(body, separators=(",", ":")).encode()


def test_json_constants_and_bad_bytes_are_400_as_before(big_client: TestClient) -> None:
    for body, fragment in (
        (b'{"instances": [[Infinity, 0, 0, 0, 0, 0, 0, 0]]}', "Infinity is not valid JSON"),
        (b'{"instances": [[-Infinity, 0, 0, 0, 0, 0, 0, 0]]}', "-Infinity is not valid JSON"),
        (b'{"instances": [[1e999, 0, 0, 0, 0, 0, 0, 0]]}', "inf is not finite"),
        (b'{"instances": [[1, 2]]', "not valid JSON"),
        (b"", "not valid JSON"),
    ):
        assert_error(big_client.post(PREDICT, content=body), 400, fragment)
