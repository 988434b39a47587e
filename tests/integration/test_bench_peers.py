"""The peers benchmark (bench/peers, ``make bench``) in miniature, so that its scripts cannot
rot: one short round of every serving scenario against our server (``python -m serving``)
and the HTTP floor, with the Python load generator (CI has no wrk), the answers checked
against predict_proba; the kfp.local peer pipeline compiled and its steps run in-process.
MLServer is left out: its venv takes minutes to build, more than make test can add."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.peers import pipelines
from bench.peers.load import Target, run_load
from bench.peers.model import rainfall_rows, register_champion, train_model
from bench.peers.runner import SCENARIOS, Plan, Served, compare, summary
from bench.peers.servers import floor_server, v2_body
from retrain.config import ModelSettings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.localstack import Stack
from retrain.statedb import Database
from tests.conftest import QUICK_MODEL, unique

pytestmark = pytest.mark.integration

# MLServer 1.7.1's answer to a 1-row V2 request asking for predict_proba (captured from it).
MLSERVER_ANSWER = (
    b'{"model_name":"rainfall","model_version":"v1","id":"8a385afc","parameters":{},'
    b'"outputs":[{"name":"predict_proba","shape":[1,2],"datatype":"FP64",'
    b'"parameters":{"content_type":"np"},"data":[0.9894667076710836,0.010533292328916468]}]}'
)


@pytest.fixture
def served(
    stack: Stack, db: Database, gcs: Any, registry: FirestoreRegistry, tmp_path: Path
) -> Any:
    """A small model trained by our train step, made the champion of a uuid-named model, and
    a config that serves only it; its registry records and files are deleted after."""
    name = unique("peers")
    spec = ModelSettings.model_validate({**QUICK_MODEL, "data_prefix": f"{name}/"})
    folder = train_model(spec, tmp_path / "trained", rows=600)
    register_champion(registry, gcs, name, folder)
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    raw["models"] = {name: spec.model_dump(mode="json", exclude_none=True)}
    config = tmp_path / "serving.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    settings = stack.settings
    features = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["features"]
    yield Served(config, stack.env(), name,
                 f"/v1/projects/{settings.project}/locations/{settings.region}",
                 folder / "model.joblib", features)  # fmt: skip
    db.client.recursive_delete(db.doc("registry", name))
    for blob in gcs.list_blobs(settings.buckets.models, prefix=f"{name}/"):
        blob.delete()


def test_one_short_round_of_every_serving_scenario(served: Served, tmp_path: Path) -> None:
    plan = Plan.quick(load="python", with_mlserver=False, with_pipelines=False, seconds=0.5,
                      max_requests=10)  # fmt: skip
    printed: list[str] = []
    report = compare(plan, served, tmp_path, out=printed.append)

    assert report.failed_requests() == 0
    assert len(report.loads) == 1
    for scenario in SCENARIOS:
        floor = report.http[(scenario.name, "HTTP floor")]
        assert len(floor) == 1
        assert floor[0].requests > 0
        ours = report.http.get((scenario.name, "ours"), [])
        refused = report.refused.get((scenario.name, "ours"), "")
        # Our server answers every size, or (10,000 full-precision rows over its body limit
        # today) refuses it with a 400 that names the limit: reported, not raised.
        assert (len(ours) == 1 and ours[0].requests > 0) or (
            scenario.rows == 10000 and refused.startswith("HTTP 400") and "limit" in refused
        ), (scenario, ours, refused)
        assert len(report.inprocess[scenario.rows]) == 1
    assert any("same probabilities as predict_proba" in line for line in printed)
    # The concurrency-1 goal's in-process predict, measured around ours, once per round.
    assert len(report.beside_ours_c1) == 1
    assert 0 < report.beside_ours_c1[0] < 1
    table = summary(report, plan)
    for scenario in SCENARIOS:
        assert f"| {scenario.name} | HTTP floor |" in table
    assert "goal, concurrency 1: ours p50 ÷ (in-process predict measured just before" in table


def test_mlserver_requests_and_answers_are_read_as_the_bench_sends_them() -> None:
    import numpy as np  # noqa: PLC0415

    from bench.peers.servers import _v2_probabilities  # noqa: PLC0415

    body = json.loads(v2_body(np.array([[1.5, 2.0], [3.0, 4.25]])))
    assert body["inputs"][0]["shape"] == [2, 2]
    assert body["inputs"][0]["data"] == [1.5, 2.0, 3.0, 4.25]
    assert body["outputs"] == [{"name": "predict_proba"}]
    assert _v2_probabilities(MLSERVER_ANSWER) == [0.010533292328916468]


def test_the_kfp_peer_compiles_and_its_steps_run(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    rainfall_rows(600).to_csv(csv, index=False)
    compiled = pipelines.compile_peer(tmp_path / "peer.yaml")
    assert "preprocess-rows" in compiled.read_text(encoding="utf-8")
    times = pipelines.kfp_peer_compute(csv, tmp_path / "compute", window=600, max_iter=10)
    assert set(times) == set(pipelines.STEPS)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make bench's)")
def test_wrk_measures_the_floor(tmp_path: Path) -> None:
    with floor_server(tmp_path) as floor:
        result = run_load(Target(floor.port, floor.path, b"{}"), 2, 1, 1000, "wrk")
    assert result.requests > 0
    assert result.errors == 0
    assert result.p99_ms >= result.p50_ms
