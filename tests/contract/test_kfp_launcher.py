"""The Kubeflow Pipelines launcher, through the real ``kfp.Client``, against a local fake
of the KFP v2beta1 API (and of the Cloud Storage routes that a launch reads)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import yaml

from pipelines.kfp_launcher import KfpLauncher
from pipelines.vertex_launcher import launch_name
from retrain.messages import RetrainRequest
from tests.contract.fake_kfp_api import FakeKfp
from tests.contract.fake_pipeline_service import (
    GOLDEN_TEMPLATE,
    FakeStorage,
    MemoryLedger,
    tasks,
    without_caching,
    write_config,
)

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.ledger import GcsLedger

pytestmark = pytest.mark.contract

MODEL = "rainfall"
EARLIER = "rainfall-20260101-030000-aaaaaa"
LATER = "rainfall-20260101-040000-bbbbbb"
KEY = "retrain-data/rainfall/2026-01-01.csv#1"
OBJECT = "gs://retrain-data/rainfall/2026-01-01.csv"


@pytest.fixture
def kfp() -> Iterator[FakeKfp]:
    with FakeKfp() as fake:
        yield fake


@pytest.fixture
def config(tmp_path: Path, kfp: FakeKfp) -> tuple[Settings, str]:
    return write_config(tmp_path, "kfp", kfp={"host": kfp.url, "experiment": "retraining"})


@pytest.fixture
def storage(config: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStorage]:
    settings, _ = config
    buckets = {
        settings.buckets.data: {"rainfall/2026-01-01.csv": b"day,rain\n1,0\n"},
        settings.buckets.artifacts: {f"pipelines/{MODEL}.yaml": GOLDEN_TEMPLATE.read_bytes()},
    }
    with FakeStorage(buckets) as fake:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake.url)
        yield fake


def pending() -> list[RetrainRequest]:
    return [
        RetrainRequest(
            model=MODEL, reason="data", data_uris=[OBJECT], dedupe_key=KEY, trigger_event_id="e1"
        )
    ]


def launcher(config: tuple[Settings, str], ledger: MemoryLedger, **options: Any) -> KfpLauncher:
    settings, text = config
    return KfpLauncher(settings, text, cast("GcsLedger", ledger), **options)


def test_one_run_is_created_in_the_experiment(
    config: tuple[Settings, str],
    kfp: FakeKfp,
    storage: FakeStorage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, text = config
    ledger = MemoryLedger(pending())

    with caplog.at_level(logging.INFO, logger="pipelines.kfp_launcher"):
        launcher(config, ledger).submit(MODEL, EARLIER)

    name = launch_name(MODEL, [KEY])
    (experiment,) = kfp.received("POST", r"/experiments$")
    assert experiment.body["display_name"] == "retraining"
    (lookup,) = kfp.received("GET", r"/runs$")
    experiment_id = next(iter(kfp.experiments))
    assert lookup.param("experiment_id") == experiment_id
    assert json.loads(str(lookup.param("filter"))) == {
        "predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]
    }
    (create,) = kfp.received("POST", r"/runs$")
    run = create.body
    assert run["display_name"] == name
    (run_id,) = kfp.runs
    assert f"run {EARLIER} of {MODEL}: created KFP run {run_id} ({name})" in caplog.text
    assert run["experiment_id"] == experiment_id
    golden = yaml.safe_load(GOLDEN_TEMPLATE.read_text(encoding="utf-8"))
    assert without_caching(run["pipeline_spec"]) == without_caching(golden)
    # Caching off in every task, the steps inside the exit handler included (kfp.Client's
    # enable_caching alone reaches the root DAG only); false is omitted, as the default.
    assert [t["cachingOptions"] for t in tasks(run["pipeline_spec"])] == [{}] * len(
        list(tasks(golden))
    )
    assert run["runtime_config"] == {
        "pipeline_root": settings.pipeline_root,
        "parameters": {
            "model": MODEL,
            "data_uris": [OBJECT],
            "request_id": KEY,
            "reason": "data",
            "run_id": EARLIER,
            "config_yaml": text,
        },
    }
    assert "service_account" not in run
    assert ledger.calls == [
        ("collect", MODEL, EARLIER),
        ("start", MODEL, EARLIER, [OBJECT]),
        ("renew", MODEL, EARLIER, settings.models[MODEL].lease_seconds),  # before the create
        ("launched", MODEL, EARLIER, f"{settings.gcp.kfp.host}#runs/{run_id}"),
    ]
    assert storage.received("GET", r"^/download/storage/v1/b/retrain-artifacts/o/pipelines")


@pytest.mark.parametrize(("state", "still_running"), [("RUNNING", True), ("FAILED", False)])
def test_the_same_events_are_not_launched_twice(
    config: tuple[Settings, str],
    kfp: FakeKfp,
    storage: FakeStorage,
    state: str,
    still_running: bool,
) -> None:
    settings, _ = config
    shared = launcher(config, MemoryLedger(pending()), template=str(GOLDEN_TEMPLATE))
    shared.submit(MODEL, EARLIER)
    (run,) = kfp.runs.values()
    run["state"] = state
    later = MemoryLedger(pending())
    shared.ledger = cast("GcsLedger", later)

    shared.submit(MODEL, LATER)

    assert len(kfp.received("POST", r"/runs$")) == 1
    assert len(kfp.received("GET", r"/runs$")) == 2
    assert len(kfp.received("GET", r"/healthz$")) == 1, "one client, made once"
    (run_id,) = kfp.runs
    if still_running:  # the lease goes to the run whose pipeline runs
        assert not list(later.of("finish"))
        (handed,) = later.of("hand_over")
        assert handed[:5] == (
            "hand_over",
            MODEL,
            LATER,
            EARLIER,
            settings.models[MODEL].lease_seconds,
        )
        why = handed[5]
    else:
        assert not list(later.of("hand_over"))
        (finish,) = later.of("finish")
        assert finish[:4] == ("finish", MODEL, LATER, "abandoned")
        why = finish[4]
    assert run_id in why
    assert EARLIER in why
    assert not storage.received("GET", r"^/download/"), "a local template is read from disk"


def test_nothing_pending_ends_the_run_without_calling_the_api(
    config: tuple[Settings, str], kfp: FakeKfp, storage: FakeStorage
) -> None:
    ledger = MemoryLedger([])

    launcher(config, ledger).submit(MODEL, EARLIER)

    assert [call[:4] for call in ledger.calls] == [
        ("collect", MODEL, EARLIER),
        ("finish", MODEL, EARLIER, "abandoned"),
    ]
    assert kfp.requests == [], "not even the client's health check: it is made lazily"
    assert storage.requests == []


def test_a_missing_template_names_the_uri(
    config: tuple[Settings, str], kfp: FakeKfp, storage: FakeStorage
) -> None:
    settings, _ = config
    storage.buckets[settings.buckets.artifacts].clear()

    with pytest.raises(FileNotFoundError, match=r"gs://retrain-artifacts/pipelines/rainfall\.yaml"):
        launcher(config, MemoryLedger(pending())).submit(MODEL, EARLIER)

    assert kfp.received("POST", r"/runs$") == []
