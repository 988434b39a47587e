"""The Vertex AI launcher, through the real aiplatform SDK, against a local fake of the
PipelineService (REST) and of the few Cloud Storage routes that a launch reads."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import yaml

from pipelines.vertex_launcher import VertexLauncher, launch_name
from retrain.messages import RetrainRequest
from retrain.vertex_sdk import aiplatform
from tests.contract.fake_pipeline_service import (
    GOLDEN_TEMPLATE,
    NETWORK,
    PIPELINE_ACCOUNT,
    FakeStorage,
    FakeVertex,
    MemoryLedger,
    tasks,
    without_caching,
    write_config,
)
from tests.contract.sdk_config import use_fake

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.ledger import GcsLedger

pytestmark = pytest.mark.contract

MODEL = "rainfall"
JOBS = r"/pipelineJobs$"
EARLIER = "rainfall-20260101-030000-aaaaaa"
LATER = "rainfall-20260101-040000-bbbbbb"


@pytest.fixture
def config(tmp_path: Path) -> tuple[Settings, str]:
    return write_config(tmp_path, "vertex")


@pytest.fixture
def storage(config: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStorage]:
    """The data bucket with two objects of the model (and one of no model), and the
    artifacts bucket with the template that ``make deploy`` uploads."""
    settings, _ = config
    buckets = {
        settings.buckets.data: {
            "rainfall/2026-01-01.csv": b"day,rain\n1,0\n",
            "rainfall/2026-01-02.csv": b"day,rain\n2,1\n",
            "other/x.csv": b"x\n",
        },
        settings.buckets.artifacts: {f"pipelines/{MODEL}.yaml": GOLDEN_TEMPLATE.read_bytes()},
    }
    with FakeStorage(buckets) as fake:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake.url)
        yield fake


@pytest.fixture
def bucket_checks(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The one stub: ``PipelineJob.submit()`` first checks the pipeline root's bucket
    through Cloud Resource Manager (projects.get, to compare project numbers), which has no
    endpoint setting and stalls 40 s offline. The stub records what it was asked."""
    gcs_utils = aiplatform("utils.gcs_utils")

    checks: list[dict[str, Any]] = []

    def check(**kwargs: Any) -> str:
        checks.append(kwargs)
        return str(kwargs["output_artifacts_gcs_dir"])

    monkeypatch.setattr(
        gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist", check
    )
    return checks


@pytest.fixture
def vertex(
    config: tuple[Settings, str],
    bucket_checks: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[FakeVertex]:
    """The fake, with the SDK pointed at it over REST, anonymously, in a fresh global
    config of the SDK (restored afterwards)."""
    settings, _ = config
    with FakeVertex(settings.project, settings.region) as fake:
        use_fake(monkeypatch, fake.url, settings.project, settings.region)
        yield fake


def requests_of(*keys: str, elsewhere: str | None = None) -> list[RetrainRequest]:
    """Data arrivals with these dedupe keys; ``elsewhere`` adds a manual request whose
    data lies outside the data bucket."""
    found = [
        RetrainRequest(
            model=MODEL,
            reason="data",
            data_uris=[f"gs://retrain-data/{key.partition('/')[2].partition('#')[0]}"],
            dedupe_key=key,
            trigger_event_id=f"event-{n}",
        )
        for n, key in enumerate(keys)
    ]
    if elsewhere:
        found.append(
            RetrainRequest(
                model=MODEL,
                reason="manual",
                data_uris=[elsewhere],
                dedupe_key="manual-1",
                trigger_event_id="manual-1",
            )
        )
    return found


KEYS = ("retrain-data/rainfall/2026-01-01.csv#1", "retrain-data/rainfall/2026-01-02.csv#1")


def launcher(config: tuple[Settings, str], ledger: MemoryLedger, **options: Any) -> VertexLauncher:
    settings, text = config
    return VertexLauncher(settings, text, cast("GcsLedger", ledger), **options)


def test_one_pipeline_job_is_submitted_for_the_pending_events(
    config: tuple[Settings, str],
    storage: FakeStorage,
    vertex: FakeVertex,
    bucket_checks: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, text = config
    ledger = MemoryLedger(requests_of(*KEYS, elsewhere="gs://elsewhere/extra.csv"))

    with caplog.at_level(logging.INFO, logger="pipelines.vertex_launcher"):
        launcher(config, ledger).submit(MODEL, EARLIER)

    (create,) = vertex.received("POST", JOBS)
    expected_id = launch_name(MODEL, [*KEYS, "manual-1"])
    assert create.param("pipelineJobId") == expected_id
    assert re.fullmatch(r"retrain-rainfall-[0-9a-f]{16}", expected_id)
    job = create.body
    golden = yaml.safe_load(GOLDEN_TEMPLATE.read_text(encoding="utf-8"))
    assert without_caching(job["pipelineSpec"]) == without_caching(golden)
    assert [t["cachingOptions"] for t in tasks(job["pipelineSpec"])] == [
        {"enableCache": False}
    ] * len(list(tasks(golden)))
    window = [
        "gs://retrain-data/rainfall/2026-01-01.csv",
        "gs://retrain-data/rainfall/2026-01-02.csv",
        "gs://elsewhere/extra.csv",
    ]
    assert job["runtimeConfig"] == {
        "gcsOutputDirectory": "gs://retrain-artifacts/pipeline-root",
        "parameterValues": {
            "model": MODEL,
            "data_uris": window,
            "request_id": KEYS[0],
            "reason": "data",
            "run_id": EARLIER,
            "config_yaml": text,
        },
    }
    assert job["serviceAccount"] == PIPELINE_ACCOUNT == settings.pipeline_service_account
    assert job["network"] == NETWORK
    assert job["displayName"] == f"retrain-{EARLIER}"
    # The job's resource name is logged with the run id, and kept in the run's record.
    job_name = vertex.jobs[expected_id]["name"]
    assert f"run {EARLIER} of {MODEL}: submitted Vertex AI pipeline job {job_name}" in caplog.text
    assert job["labels"] == {
        "team": "forecasting",
        "retrain_model": MODEL,
        "retrain_run": EARLIER,
        "retrain_reason": "data",
    }
    # The run took its events and data window, and holds the lease: it did not finish.
    # The lease is extended to the run's length before the job is submitted.
    assert ledger.calls == [
        ("collect", MODEL, EARLIER),
        ("start", MODEL, EARLIER, window),
        ("renew", MODEL, EARLIER, settings.models[MODEL].lease_seconds),
        ("launched", MODEL, EARLIER, job_name),
    ]
    # What storage saw: the data window and the template (the clients also read each
    # bucket's metadata, not always first).
    assert sorted(r.path for r in storage.requests) == [
        "/download/storage/v1/b/retrain-artifacts/o/pipelines%2Frainfall.yaml",
        "/storage/v1/b/retrain-artifacts",
        "/storage/v1/b/retrain-data",
        "/storage/v1/b/retrain-data/o",
    ]
    (listing,) = storage.received("GET", r"/o$")
    assert listing.param("prefix") == "rainfall/"
    # The SDK checked the pipeline root's bucket once, for the run's service account.
    assert [(c["output_artifacts_gcs_dir"], c["service_account"]) for c in bucket_checks] == [
        (settings.pipeline_root, PIPELINE_ACCOUNT)
    ]


@pytest.mark.parametrize(
    ("state", "still_running"),
    [("PIPELINE_STATE_RUNNING", True), ("PIPELINE_STATE_SUCCEEDED", False)],
)
def test_the_same_events_are_not_launched_twice(
    config: tuple[Settings, str],
    storage: FakeStorage,
    vertex: FakeVertex,
    state: str,
    still_running: bool,
) -> None:
    settings, _ = config
    local = {"template": str(GOLDEN_TEMPLATE)}
    launcher(config, MemoryLedger(requests_of(*KEYS)), **local).submit(MODEL, EARLIER)
    (job,) = vertex.jobs.values()
    job["state"] = state

    # The earlier run's lease expired and the ledger requeued its events; a later run
    # takes them and gets 409 ALREADY_EXISTS for the same job id.
    later = MemoryLedger(requests_of(*KEYS))
    launcher(config, later, **local).submit(MODEL, LATER)

    first, second = vertex.received("POST", JOBS)
    assert first.param("pipelineJobId") == second.param("pipelineJobId")
    assert second.body["runtimeConfig"]["parameterValues"]["run_id"] == LATER
    assert len(vertex.jobs) == 1
    (lookup,) = vertex.received("GET", JOBS.replace("$", "/"))
    job_name = vertex.jobs[str(first.param("pipelineJobId"))]["name"]
    assert lookup.path == f"/v1/{job_name}"
    # The later run launched nothing: it ends, naming the job and the run that has them.
    # While that job runs, the lease goes to its run (whose report releases it), so that
    # no other run starts meanwhile; once it ended, the lease is simply freed.
    if still_running:
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
    assert job_name in why
    assert EARLIER in why
    # A local template is read from disk, not from storage.
    assert not storage.received("GET", r"^/download/")


def test_a_retried_submit_of_the_same_run_is_quiet(
    config: tuple[Settings, str], storage: FakeStorage, vertex: FakeVertex
) -> None:
    launcher(config, MemoryLedger(requests_of(KEYS[0]))).submit(MODEL, EARLIER)
    again = MemoryLedger(requests_of(KEYS[0]))
    launcher(config, again).submit(MODEL, EARLIER)

    assert len(vertex.received("POST", JOBS)) == 2
    assert len(vertex.jobs) == 1
    assert not list(again.of("finish")), "the run's own job exists: it keeps its lease"


def test_nothing_pending_ends_the_run_without_calling_the_api(
    config: tuple[Settings, str], storage: FakeStorage, vertex: FakeVertex
) -> None:
    ledger = MemoryLedger([])

    launcher(config, ledger).submit(MODEL, EARLIER)

    assert ledger.calls == [
        ("collect", MODEL, EARLIER),
        ("finish", MODEL, EARLIER, "abandoned", f"no pending events for {MODEL}; another run "
         "covered them"),
    ]  # fmt: skip
    assert vertex.requests == []
    assert storage.requests == []


def test_a_run_that_lost_its_lease_submits_nothing_and_gives_its_events_back(
    config: tuple[Settings, str], storage: FakeStorage, vertex: FakeVertex
) -> None:
    ledger = MemoryLedger(requests_of(KEYS[0]), holds=False)  # taken over while gathering

    launcher(config, ledger, template=str(GOLDEN_TEMPLATE)).submit(MODEL, EARLIER)

    assert vertex.received("POST", JOBS) == []
    assert [call[0] for call in ledger.calls] == ["collect", "start", "renew", "abandon"]
