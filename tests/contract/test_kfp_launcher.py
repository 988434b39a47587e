"""The Kubeflow Pipelines launcher, through the real ``kfp.Client``, against a local fake
of the KFP v2beta1 API (and of the Cloud Storage routes that a launch reads), with the
real ledger on the Firestore emulator of the session's stack."""

from __future__ import annotations

import copy
import importlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from pipelines.kfp_launcher import KfpLauncher
from pipelines.launch import launch_name
from retrain.ledger import FirestoreLedger, Lease, RunRecord, new_run_id
from retrain.messages import RetrainRequest
from tests.contract.fake_kfp_api import FakeKfp
from tests.contract.fake_pipeline_service import (
    GOLDEN_TEMPLATE,
    FakeStorage,
    Recorded,
    TakenOverLedger,
    tasks,
    without_caching,
    write_config,
)

if TYPE_CHECKING:
    from retrain.config import Settings
    from tests.contract.conftest import Clock

pytestmark = pytest.mark.contract

EXPERIMENT = "retraining"
GATHERING = 60.0  # the lease of a run while it gathers (the service's is a few minutes)

# Each RuntimeState of the v2beta1 API, and what the sweep is told of it: a run that may
# still train keeps its lease; one that is over (or in no defined state) lets it go.
STATES = {
    "PENDING": "running",
    "RUNNING": "running",
    "PAUSED": "running",
    "CANCELING": "running",
    "SUCCEEDED": "ended",
    "SKIPPED": "ended",
    "FAILED": "ended",
    "CANCELED": "ended",
    "RUNTIME_STATE_UNSPECIFIED": "running",  # unknown yet: never taken over
}


@pytest.fixture
def kfp() -> Iterator[FakeKfp]:
    with FakeKfp() as fake:
        yield fake


@pytest.fixture
def config(tmp_path: Path, kfp: FakeKfp, model: str) -> tuple[Settings, str]:
    return write_config(
        tmp_path,
        "kfp",
        {model: {"data_prefix": f"{model}/"}},
        kfp={"host": kfp.url, "experiment": EXPERIMENT},
    )


@pytest.fixture
def storage(
    config: tuple[Settings, str], model: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeStorage]:
    settings, _ = config
    buckets = {
        settings.buckets.data: {f"{model}/2026-01-01.csv": b"day,rain\n1,0\n"},
        settings.buckets.artifacts: {f"pipelines/{model}.yaml": GOLDEN_TEMPLATE.read_bytes()},
    }
    with FakeStorage(buckets) as fake:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake.url)
        yield fake


def key(model: str, day: int = 1) -> str:
    return f"retrain-data/{model}/2026-01-0{day}.csv#1"


def data_object(model: str) -> str:
    return f"gs://retrain-data/{model}/2026-01-01.csv"


def request(model: str, day: int = 1) -> RetrainRequest:
    return RetrainRequest(
        model=model,
        reason="data",
        data_uris=[data_object(model)],
        dedupe_key=key(model, day),
        trigger_event_id=f"e{day}",
    )


def waiting(ledger: FirestoreLedger, *requests: RetrainRequest) -> None:
    """The events arrived: each is claimed, and waits for a run."""
    for each in requests:
        assert ledger.claim(each) == "new"


def holding(ledger: FirestoreLedger, model: str) -> str:
    """A new run that holds the model's lease (as the service's kick makes one); its id."""
    run_id = new_run_id(model)
    assert ledger.acquire(model, run_id, GATHERING).acquired
    return run_id


def launcher(config: tuple[Settings, str], ledger: FirestoreLedger, **options: Any) -> KfpLauncher:
    settings, text = config
    return KfpLauncher(settings, text, ledger, **options)


def record(ledger: FirestoreLedger, model: str, run_id: str) -> RunRecord:
    found = ledger.run(model, run_id)
    assert found is not None, f"run {run_id} has no record"
    return found


def name_filter(name: str) -> dict[str, Any]:
    return {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}


def test_one_run_named_after_the_run_is_created_in_the_experiment(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    clock: Clock,
    kfp: FakeKfp,
    storage: FakeStorage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, text = config
    lease_seconds = settings.models[model].lease_seconds
    assert lease_seconds != GATHERING
    waiting(ledger, request(model))
    run_id = holding(ledger, model)
    at_create: list[Lease | None] = []

    def look(seen: Recorded) -> None:
        if seen.method == "POST" and seen.path.endswith("/runs"):
            at_create.append(ledger.lease(model))

    kfp.on_request = look
    with caplog.at_level(logging.INFO, logger="pipelines.kfp_launcher"):
        launcher(config, ledger).submit(model, run_id)

    name = launch_name(run_id)
    assert name == f"retrain-{run_id}", "the run's name is the run's, not its events'"
    (experiment,) = kfp.received("POST", r"/experiments$")
    assert experiment.body["display_name"] == EXPERIMENT
    (lookup,) = kfp.received("GET", r"/runs$")
    experiment_id = next(iter(kfp.experiments))
    assert lookup.param("experiment_id") == experiment_id
    assert json.loads(str(lookup.param("filter"))) == name_filter(name)
    (create,) = kfp.received("POST", r"/runs$")
    run = create.body
    assert run["display_name"] == name
    (kfp_run_id,) = kfp.runs
    assert f"run {run_id} of {model}: created KFP run {kfp_run_id} ({name})" in caplog.text
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
            "model": model,
            "data_uris": [data_object(model)],
            "request_id": key(model),
            "reason": "data",
            "run_id": run_id,
            "config_yaml": text,
        },
    }
    assert "service_account" not in run
    # The run took its event and data window and holds the lease (it did not finish);
    # the lease was extended to the run's length before the KFP run was created.
    held = Lease(run_id, clock.now, clock.now + lease_seconds)
    assert at_create == [held]
    assert ledger.lease(model) == held
    recorded = record(ledger, model, run_id)
    assert (recorded.state, recorded.ended_at, recorded.finished_at) == ("running", None, None)
    assert [e["dedupe_key"] for e in recorded.events] == [key(model)]
    assert recorded.data_uris == [data_object(model)]
    assert recorded.launched_as == f"{settings.gcp.kfp.host}#runs/{kfp_run_id}"
    assert not ledger.has_pending(model)
    assert storage.received(
        "GET", rf"^/download/storage/v1/b/retrain-artifacts/o/pipelines%2F{model}"
    )
    # The sweep finds the KFP run by the run's id alone: it runs (the fake's runs start
    # PENDING).
    assert launcher(config, ledger).state(model, recorded) == "running"


def test_events_of_a_run_that_ended_without_a_report_run_again_under_a_new_name(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    storage: FakeStorage,
) -> None:
    """The KFP run is named after the ledger's run, so the same events, taken over by a
    later run, are a new KFP run, not the dead one found by name."""
    local = launcher(config, ledger, template=str(GOLDEN_TEMPLATE))
    waiting(ledger, request(model))
    earlier = holding(ledger, model)
    local.submit(model, earlier)
    (first,) = kfp.runs.values()
    first["state"] = "FAILED"
    assert local.state(model, record(ledger, model, earlier)) == "ended"

    later = new_run_id(model)  # the sweep takes the lease over; the event waits again
    assert ledger.take_over(model, earlier, later, GATHERING, "its pipeline ended")
    local.submit(model, later)

    creates = kfp.received("POST", r"/runs$")
    assert [c.body["display_name"] for c in creates] == [launch_name(earlier), launch_name(later)]
    assert launch_name(earlier) != launch_name(later)
    parameters = creates[1].body["runtime_config"]["parameters"]
    assert (parameters["run_id"], parameters["request_id"]) == (later, key(model))
    (second,) = [r for r in kfp.runs.values() if r["display_name"] == launch_name(later)]
    assert record(ledger, model, earlier).state == "abandoned"
    run = record(ledger, model, later)
    assert run.state == "running"
    assert run.launched_as == f"{config[0].gcp.kfp.host}#runs/{second['run_id']}"
    assert [e["dedupe_key"] for e in run.events] == [key(model)]
    lease = ledger.lease(model)
    assert lease is not None
    assert lease.run_id == later
    assert len(kfp.received("GET", r"/healthz$")) == 1, "one client, made once"
    assert not storage.received("GET", r"^/download/"), "a local template is read from disk"


def test_a_retried_submit_that_finds_its_run_creates_nothing(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    storage: FakeStorage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """KFP does not refuse a second run of the same name: the launcher looks for it by
    name in the experiment, and the retry is quiet: no second run, the run keeps its lease."""
    settings, _ = config
    local = launcher(config, ledger, template=str(GOLDEN_TEMPLATE))
    waiting(ledger, request(model))
    run_id = holding(ledger, model)
    local.submit(model, run_id)
    kfp_runs = copy.deepcopy(kfp.runs)
    (kfp_run_id,) = kfp_runs
    # An event arrives meanwhile, so that the retry gathers something and reaches the API.
    waiting(ledger, request(model, day=2))

    with caplog.at_level(logging.INFO, logger="pipelines.kfp_launcher"):
        local.submit(model, run_id)

    assert len(kfp.received("POST", r"/runs$")) == 1
    assert kfp.runs == kfp_runs, "one KFP run, as the first attempt made it"
    lookups = kfp.received("GET", r"/runs$")
    assert [json.loads(str(r.param("filter"))) for r in lookups] == [
        name_filter(launch_name(run_id))
    ] * len(lookups)
    assert f"run {run_id} of {model}: already launched as KFP run {kfp_run_id}" in caplog.text
    run = record(ledger, model, run_id)
    assert (run.state, run.ended_at, run.finished_at) == ("running", None, None)
    assert run.launched_as == f"{settings.gcp.kfp.host}#runs/{kfp_run_id}"
    lease = ledger.lease(model)
    assert lease is not None
    assert lease.run_id == run_id


@pytest.mark.parametrize("arrived", [False, True], ids=["nothing-new", "a-new-event"])
def test_a_retried_submit_leaves_the_run_and_the_waiting_events_alone(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    storage: FakeStorage,
    arrived: bool,
) -> None:
    local = launcher(config, ledger, template=str(GOLDEN_TEMPLATE))
    waiting(ledger, request(model))
    run_id = holding(ledger, model)
    local.submit(model, run_id)
    if arrived:
        waiting(ledger, request(model, day=2))

    local.submit(model, run_id)

    assert len(kfp.runs) == 1
    run = record(ledger, model, run_id)
    assert (run.state, run.ended_at) == ("running", None), "its KFP run runs"
    assert [e["dedupe_key"] for e in run.events] == [key(model)], "what its KFP run trains on"
    lease = ledger.lease(model)
    assert lease is not None
    assert lease.run_id == run_id
    assert [r.dedupe_key for r in ledger.pending(model)] == ([key(model, 2)] if arrived else [])


@pytest.mark.parametrize(("state", "expected"), sorted(STATES.items()))
def test_the_state_of_a_run_is_its_kfp_run_s(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    state: str,
    expected: str,
) -> None:
    experiment = kfp.seed_experiment(EXPERIMENT)
    run_id = new_run_id(model)
    kfp.seed_run(launch_name(run_id), experiment, state)
    kfp.seed_run(launch_name(new_run_id(model)), experiment, "RUNNING")  # another run's

    found = launcher(config, ledger).state(model, RunRecord(model, run_id, "running"))

    assert found == expected
    (lookup,) = kfp.received("GET", r"/runs$")
    assert lookup.param("experiment_id") == experiment
    assert json.loads(str(lookup.param("filter"))) == name_filter(launch_name(run_id))
    assert kfp.writes() == []


def test_the_state_of_a_run_without_a_kfp_run_is_absent(
    config: tuple[Settings, str], model: str, ledger: FirestoreLedger, kfp: FakeKfp
) -> None:
    experiment = kfp.seed_experiment(EXPERIMENT)
    kfp.seed_run(launch_name(new_run_id(model)), experiment, "RUNNING")  # another run's
    run = RunRecord(model, new_run_id(model), "gathering")

    assert launcher(config, ledger).state(model, run) == "absent"

    assert len(kfp.received("GET", r"/runs$")) == 1
    assert kfp.writes() == []


def test_the_state_of_a_run_without_the_experiment_is_absent(
    config: tuple[Settings, str], model: str, ledger: FirestoreLedger, kfp: FakeKfp
) -> None:
    kfp.seed_experiment("someone-else's")
    run = RunRecord(model, new_run_id(model), "gathering")

    assert launcher(config, ledger).state(model, run) == "absent"

    assert kfp.writes() == [], "asking creates no experiment"
    assert kfp.received("GET", r"/runs$") == []


def test_every_state_of_the_api_is_classified() -> None:
    # By name: kfp_server_api (kfp.Client's generated REST client) ships no type hints.
    models = importlib.import_module("kfp_server_api.models")
    assert set(models.V2beta1RuntimeState.allowable_values) == set(STATES)


def test_nothing_waiting_ends_the_run_without_calling_the_api(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    storage: FakeStorage,
) -> None:
    run_id = holding(ledger, model)

    launcher(config, ledger).submit(model, run_id)

    run = record(ledger, model, run_id)
    assert (run.state, run.error) == (
        "abandoned",
        f"no pending events for {model}; another run covered them",
    )
    assert ledger.lease(model) is None
    assert kfp.requests == [], "not even the client's health check: it is made lazily"
    assert storage.requests == []


def test_a_missing_template_names_the_uri(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    storage: FakeStorage,
) -> None:
    settings, _ = config
    storage.buckets[settings.buckets.artifacts].clear()
    waiting(ledger, request(model))
    run_id = holding(ledger, model)

    with pytest.raises(FileNotFoundError, match=rf"gs://retrain-artifacts/pipelines/{model}\.yaml"):
        launcher(config, ledger).submit(model, run_id)

    assert kfp.received("POST", r"/runs$") == []


@pytest.mark.parametrize("ended", [True, False], ids=["taken-over", "lost"])
def test_a_run_that_lost_its_lease_creates_nothing_and_gives_its_events_back(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    storage: FakeStorage,
    caplog: pytest.LogCaptureFixture,
    ended: bool,
) -> None:
    waiting(ledger, request(model), request(model, day=2))
    run_id = holding(ledger, model)
    rival = new_run_id(model)
    overtaken = TakenOverLedger(ledger, rival, ended=ended)  # right after it gathered

    with caplog.at_level(logging.WARNING, logger="pipelines.launch"):
        launcher(config, overtaken, template=str(GOLDEN_TEMPLATE)).submit(model, run_id)

    assert kfp.received("POST", r"/runs$") == []
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
    both = [key(model), key(model, 2)]
    assert [r.dedupe_key for r in ledger.pending(model)] == both
    assert [r.dedupe_key for r in ledger.collect(model, rival)] == both


@pytest.mark.parametrize(("recurring", "adopted"), [("rr-1", True), (None, False)])
def test_a_run_of_the_models_recurring_run_is_recognised(
    config: tuple[Settings, str],
    model: str,
    ledger: FirestoreLedger,
    kfp: FakeKfp,
    recurring: str | None,
    adopted: bool,
) -> None:
    experiment = kfp.seed_experiment(EXPERIMENT)
    kfp.seed_run(f"retrain-{model}-1", experiment, "SUCCEEDED", recurring_run_id=recurring)

    assert launcher(config, ledger).scheduled(model, f"retrain-{model}-1") is adopted
    assert launcher(config, ledger).scheduled(model, f"retrain-{model}-2") is False
    assert kfp.writes() == []
