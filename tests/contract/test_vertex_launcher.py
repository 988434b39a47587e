"""The Vertex AI launcher, through the real aiplatform SDK, against a local fake of the
PipelineService (REST) and of the few Cloud Storage routes that a launch reads, with the
real ledger on the Firestore emulator of the session's stack."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from pipelines.launch import launch_name
from pipelines.vertex_launcher import VertexLauncher
from retrain.ledger import FirestoreLedger, Lease, RunRecord, new_run_id
from retrain.messages import RetrainRequest
from retrain.vertex_sdk import aiplatform
from tests.contract.fake_pipeline_service import (
    GOLDEN_TEMPLATE,
    NETWORK,
    PIPELINE_ACCOUNT,
    FakeStorage,
    FakeVertex,
    Recorded,
    TakenOverLedger,
    tasks,
    without_caching,
    write_config,
)
from tests.contract.sdk_config import use_fake

if TYPE_CHECKING:
    from retrain.config import Settings
    from tests.contract.conftest import Clock

pytestmark = pytest.mark.contract

JOBS = r"/pipelineJobs$"
GATHERING = 60.0  # the lease of a run while it gathers (the service's is a few minutes)

# Each state of the API, and what the sweep is told of it: a job that may still train
# keeps its lease; one that is over (or in no state the API defines) lets it go.
STATES = {
    "PIPELINE_STATE_QUEUED": "running",
    "PIPELINE_STATE_PENDING": "running",
    "PIPELINE_STATE_RUNNING": "running",
    "PIPELINE_STATE_PAUSED": "running",
    "PIPELINE_STATE_CANCELLING": "running",
    "PIPELINE_STATE_SUCCEEDED": "ended",
    "PIPELINE_STATE_FAILED": "ended",
    "PIPELINE_STATE_CANCELLED": "ended",
    "PIPELINE_STATE_UNSPECIFIED": "running",  # unknown yet: never taken over
}


@pytest.fixture
def config(tmp_path: Path, model: str) -> tuple[Settings, str]:
    return write_config(tmp_path, "vertex", {model: {"data_prefix": f"{model}/"}})


@pytest.fixture
def storage(
    config: tuple[Settings, str], model: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeStorage]:
    """The data bucket with two objects of the model (and one of no model), and the
    artifacts bucket with the template that ``make deploy`` uploads."""
    settings, _ = config
    buckets = {
        settings.buckets.data: {
            f"{model}/2026-01-01.csv": b"day,rain\n1,0\n",
            f"{model}/2026-01-02.csv": b"day,rain\n2,1\n",
            "other/x.csv": b"x\n",
        },
        settings.buckets.artifacts: {f"pipelines/{model}.yaml": GOLDEN_TEMPLATE.read_bytes()},
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


def keys(model: str) -> tuple[str, str]:
    return (
        f"retrain-data/{model}/2026-01-01.csv#1",
        f"retrain-data/{model}/2026-01-02.csv#1",
    )


def requests_of(
    model: str, *dedupe_keys: str, elsewhere: str | None = None
) -> list[RetrainRequest]:
    """Data arrivals with these dedupe keys; ``elsewhere`` adds a manual request whose
    data lies outside the data bucket."""
    found = [
        RetrainRequest(
            model=model,
            reason="data",
            data_uris=[f"gs://retrain-data/{key.partition('/')[2].partition('#')[0]}"],
            dedupe_key=key,
            trigger_event_id=f"event-{n}",
        )
        for n, key in enumerate(dedupe_keys)
    ]
    if elsewhere:
        found.append(
            RetrainRequest(
                model=model,
                reason="manual",
                data_uris=[elsewhere],
                dedupe_key="manual-1",
                trigger_event_id="manual-1",
            )
        )
    return found


def waiting(ledger: FirestoreLedger, requests: list[RetrainRequest]) -> None:
    """The events arrived: each is claimed, and waits for a run."""
    for request in requests:
        assert ledger.claim(request) == "new"


def holding(ledger: FirestoreLedger, model: str) -> str:
    """A new run that holds the model's lease (as the service's kick makes one); its id."""
    run_id = new_run_id(model)
    assert ledger.acquire(model, run_id, GATHERING).acquired
    return run_id


def launcher(
    config: tuple[Settings, str], ledger: FirestoreLedger, **options: Any
) -> VertexLauncher:
    settings, text = config
    return VertexLauncher(settings, text, ledger, **options)


def record(ledger: FirestoreLedger, model: str, run_id: str) -> RunRecord:
    found = ledger.run(model, run_id)
    assert found is not None, f"run {run_id} has no record"
    return found


def test_one_pipeline_job_named_after_the_run_is_submitted_for_the_waiting_events(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    clock: Clock,
    storage: FakeStorage,
    vertex: FakeVertex,
    bucket_checks: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, text = config
    lease_seconds = settings.models[model].lease_seconds
    assert lease_seconds != GATHERING
    waiting(ledger, requests_of(model, *keys(model), elsewhere="gs://elsewhere/extra.csv"))
    run_id = holding(ledger, model)
    at_create: list[Lease | None] = []

    def look(request: Recorded) -> None:
        if request.method == "POST" and re.search(JOBS, request.path):
            at_create.append(ledger.lease(model))

    vertex.on_request = look
    with caplog.at_level(logging.INFO, logger="pipelines.vertex_launcher"):
        launcher(config, ledger).submit(model, run_id)

    (create,) = vertex.received("POST", JOBS)
    # The job id is the run's, not its events': one run, one job.
    assert create.param("pipelineJobId") == launch_name(run_id) == f"retrain-{run_id}"
    job = create.body
    golden = yaml.safe_load(GOLDEN_TEMPLATE.read_text(encoding="utf-8"))
    assert without_caching(job["pipelineSpec"]) == without_caching(golden)
    assert [t["cachingOptions"] for t in tasks(job["pipelineSpec"])] == [
        {"enableCache": False}
    ] * len(list(tasks(golden)))
    window = [
        f"gs://retrain-data/{model}/2026-01-01.csv",
        f"gs://retrain-data/{model}/2026-01-02.csv",
        "gs://elsewhere/extra.csv",
    ]
    assert job["runtimeConfig"] == {
        "gcsOutputDirectory": "gs://retrain-artifacts/pipeline-root",
        "parameterValues": {
            "model": model,
            "data_uris": window,
            "request_id": keys(model)[0],
            "reason": "data",
            "run_id": run_id,
            "config_yaml": text,
        },
    }
    assert job["serviceAccount"] == PIPELINE_ACCOUNT == settings.pipeline_service_account
    assert job["network"] == NETWORK
    assert job["displayName"] == f"retrain-{run_id}"
    # The job's resource name is logged with the run id, and kept in the run's record.
    job_name = vertex.jobs[launch_name(run_id)]["name"]
    assert f"run {run_id} of {model}: submitted Vertex AI pipeline job {job_name}" in caplog.text
    assert job["labels"] == {
        "team": "forecasting",
        "retrain_model": model,
        "retrain_run": run_id,
        "retrain_reason": "data",
    }
    # The run took its events and its data window, and holds the lease (it did not
    # finish); the lease was extended to the run's length before the job was created.
    run = record(ledger, model, run_id)
    assert (run.state, run.ended_at, run.finished_at) == ("running", None, None)
    assert sorted(e["dedupe_key"] for e in run.events) == sorted([*keys(model), "manual-1"])
    assert (run.request_id, run.reason) == (keys(model)[0], "data")
    assert run.data_uris == window
    assert run.launched_as == job_name
    held = Lease(run_id, clock.now, clock.now + lease_seconds)
    assert at_create == [held]
    assert ledger.lease(model) == held
    assert not ledger.has_pending(model)
    # What storage saw: the data window and the template (the clients also read each
    # bucket's metadata, not always first).
    assert sorted(r.path for r in storage.requests) == [
        f"/download/storage/v1/b/retrain-artifacts/o/pipelines%2F{model}.yaml",
        "/storage/v1/b/retrain-artifacts",
        "/storage/v1/b/retrain-data",
        "/storage/v1/b/retrain-data/o",
    ]
    (listing,) = storage.received("GET", r"/o$")
    assert listing.param("prefix") == f"{model}/"
    # The SDK checked the pipeline root's bucket once, for the run's service account.
    assert [(c["output_artifacts_gcs_dir"], c["service_account"]) for c in bucket_checks] == [
        (settings.pipeline_root, PIPELINE_ACCOUNT)
    ]
    # The sweep finds the job by the run's id alone: it runs.
    assert launcher(config, ledger).state(model, run) == "running"


def test_events_of_a_job_that_ended_without_a_report_run_again_as_a_new_job(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    storage: FakeStorage,
    vertex: FakeVertex,
) -> None:
    """The job is named after the run, so the same events, taken over by a later run,
    are a new job, not a 409 for the dead one."""
    local = launcher(config, ledger, template=str(GOLDEN_TEMPLATE))
    waiting(ledger, requests_of(model, keys(model)[0]))
    earlier = holding(ledger, model)
    local.submit(model, earlier)
    vertex.jobs[launch_name(earlier)]["state"] = "PIPELINE_STATE_FAILED"
    assert local.state(model, record(ledger, model, earlier)) == "ended"

    later = new_run_id(model)  # the sweep takes the lease over; the events wait again
    assert ledger.take_over(model, earlier, later, GATHERING, "its pipeline ended")
    local.submit(model, later)

    first, second = vertex.received("POST", JOBS)
    assert first.param("pipelineJobId") == launch_name(earlier)
    assert second.param("pipelineJobId") == launch_name(later) != launch_name(earlier)
    assert sorted(vertex.jobs) == sorted([launch_name(earlier), launch_name(later)])
    parameters = second.body["runtimeConfig"]["parameterValues"]
    assert (parameters["run_id"], parameters["request_id"]) == (later, keys(model)[0])
    assert record(ledger, model, earlier).state == "abandoned"
    run = record(ledger, model, later)
    assert run.state == "running"
    assert run.launched_as == vertex.jobs[launch_name(later)]["name"]
    assert [e["dedupe_key"] for e in run.events] == [keys(model)[0]]
    lease = ledger.lease(model)
    assert lease is not None
    assert lease.run_id == later
    assert not storage.received("GET", r"^/download/"), "a local template is read from disk"


def test_a_retried_submit_that_finds_its_job_submits_nothing(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    storage: FakeStorage,
    vertex: FakeVertex,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run's job exists (an earlier attempt of the submit made it): Vertex AI refuses
    the job id (409), and the retry is quiet: no second job, the run keeps its lease."""
    settings, _ = config
    local = launcher(config, ledger, template=str(GOLDEN_TEMPLATE))
    waiting(ledger, requests_of(model, keys(model)[0]))
    run_id = holding(ledger, model)
    local.submit(model, run_id)
    job = copy.deepcopy(vertex.jobs[launch_name(run_id)])
    # An event arrives meanwhile, so that the retry gathers something and reaches the API.
    waiting(ledger, requests_of(model, keys(model)[1]))

    with caplog.at_level(logging.INFO, logger="pipelines.vertex_launcher"):
        local.submit(model, run_id)

    assert {r.param("pipelineJobId") for r in vertex.received("POST", JOBS)} == {
        launch_name(run_id)
    }
    assert vertex.jobs == {launch_name(run_id): job}, "one job, as the first attempt made it"
    assert f"run {run_id} of {model}: already launched as {job['name']}" in caplog.text
    run = record(ledger, model, run_id)
    assert (run.state, run.ended_at, run.finished_at) == ("running", None, None)
    assert run.launched_as == job["name"]
    assert ledger.lease(model) == Lease(
        run_id, ledger.clock(), ledger.clock() + settings.models[model].lease_seconds
    )


@pytest.mark.parametrize("arrived", [False, True], ids=["nothing-new", "a-new-event"])
def test_a_retried_submit_leaves_the_run_and_the_waiting_events_alone(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    storage: FakeStorage,
    vertex: FakeVertex,
    arrived: bool,
) -> None:
    local = launcher(config, ledger, template=str(GOLDEN_TEMPLATE))
    waiting(ledger, requests_of(model, keys(model)[0]))
    run_id = holding(ledger, model)
    local.submit(model, run_id)
    if arrived:
        waiting(ledger, requests_of(model, keys(model)[1]))

    local.submit(model, run_id)

    assert list(vertex.jobs) == [launch_name(run_id)]
    run = record(ledger, model, run_id)
    assert (run.state, run.ended_at) == ("running", None), "its job runs"
    assert [e["dedupe_key"] for e in run.events] == [keys(model)[0]], "what its job trains on"
    lease = ledger.lease(model)
    assert lease is not None
    assert lease.run_id == run_id
    assert [r.dedupe_key for r in ledger.pending(model)] == ([keys(model)[1]] if arrived else [])


@pytest.mark.parametrize(("state", "expected"), sorted(STATES.items()))
def test_the_state_of_a_run_is_its_job_s(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    vertex: FakeVertex,
    state: str,
    expected: str,
) -> None:
    run_id = new_run_id(model)
    name = vertex.seed_job(launch_name(run_id), state)
    vertex.seed_job(launch_name(new_run_id(model)), "PIPELINE_STATE_RUNNING")  # another run's

    found = launcher(config, ledger).state(model, RunRecord(model, run_id, "running"))

    assert found == expected
    (lookup,) = vertex.requests
    assert (lookup.method, lookup.path) == ("GET", f"/v1/{name}")


def test_the_state_of_a_run_whose_job_does_not_exist_is_absent(
    config: tuple[Settings, str], model: str, ledger: FirestoreLedger, vertex: FakeVertex
) -> None:
    vertex.seed_job(launch_name(new_run_id(model)), "PIPELINE_STATE_RUNNING")  # another run's
    run_id = new_run_id(model)

    assert launcher(config, ledger).state(model, RunRecord(model, run_id, "gathering")) == "absent"

    (lookup,) = vertex.requests
    assert lookup.path == f"/v1/{vertex.parent}/pipelineJobs/{launch_name(run_id)}"
    assert vertex.writes() == []


def test_every_state_of_the_api_is_classified() -> None:
    pipeline_state = aiplatform("compat.types").pipeline_state
    assert {state.name for state in pipeline_state.PipelineState} == set(STATES)


def test_nothing_waiting_ends_the_run_without_calling_the_api(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    storage: FakeStorage,
    vertex: FakeVertex,
) -> None:
    run_id = holding(ledger, model)

    launcher(config, ledger).submit(model, run_id)

    run = record(ledger, model, run_id)
    assert (run.state, run.error) == (
        "abandoned",
        f"no pending events for {model}; another run covered them",
    )
    assert ledger.lease(model) is None
    assert vertex.requests == []
    assert storage.requests == []


@pytest.mark.parametrize("ended", [True, False], ids=["taken-over", "lost"])
def test_a_run_that_lost_its_lease_submits_nothing_and_gives_its_events_back(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    storage: FakeStorage,
    vertex: FakeVertex,
    bucket_checks: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
    ended: bool,
) -> None:
    waiting(ledger, requests_of(model, *keys(model)))
    run_id = holding(ledger, model)
    rival = new_run_id(model)
    overtaken = TakenOverLedger(ledger, rival, ended=ended)  # right after it gathered

    with caplog.at_level(logging.WARNING, logger="pipelines.launch"):
        launcher(config, overtaken, template=str(GOLDEN_TEMPLATE)).submit(model, run_id)

    assert vertex.received("POST", JOBS) == []
    assert bucket_checks == [], "submit() was never called"
    assert f"run {run_id} of {model}: lost the model's lease before submitting" in caplog.text
    run = record(ledger, model, run_id)
    assert run.state == "abandoned"
    if not ended:  # the lease moved, but the run had not ended: it gave up by itself
        assert run.error == "lost the model's lease before submitting"
    assert run.launched_as is None
    lease = ledger.lease(model)
    assert lease is not None
    assert lease.run_id == rival, "the lease stays with the run that took it"
    # Its events wait again, and the run that holds the lease now takes them.
    assert [r.dedupe_key for r in ledger.pending(model)] == list(keys(model))
    assert [r.dedupe_key for r in ledger.collect(model, rival)] == list(keys(model))


@pytest.mark.parametrize(
    ("labels", "schedule", "adopted"),
    [
        ({"retrain_model": "{model}", "retrain_reason": "schedule"}, "s-1", True),
        ({"retrain_model": "{model}", "retrain_reason": "schedule"}, None, False),  # by hand
        ({"retrain_model": "other", "retrain_reason": "schedule"}, "s-1", False),
        ({"retrain_model": "{model}", "retrain_reason": "data"}, "s-1", False),
    ],
)
def test_a_job_of_the_models_pipeline_schedule_is_recognised(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    vertex: FakeVertex,
    labels: dict[str, str],
    schedule: str | None,
    adopted: bool,
) -> None:
    job_id = f"retrain-{model}-20260101030000"
    labels = {k: v.format(model=model) for k, v in labels.items()}
    name = vertex.seed_job(job_id, "PIPELINE_STATE_SUCCEEDED", labels=labels, schedule=schedule)

    assert launcher(config, ledger).scheduled(model, job_id) is adopted
    assert launcher(config, ledger).scheduled(model, f"{job_id}-unknown") is False
    assert [(r.method, r.path) for r in vertex.requests][:1] == [("GET", f"/v1/{name}")]
