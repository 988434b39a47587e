"""``schedule sync``: through the real aiplatform SDK against a fake ScheduleService, and
through the real ``kfp.Client`` against a fake KFP API (recurring runs)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from pipelines.kfp_launcher import kfp_client
from pipelines.schedules import Change, ScheduleError, sync_kfp_schedules, sync_vertex_schedules
from tests.contract.fake_kfp_api import FakeKfp
from tests.contract.fake_pipeline_service import (
    GOLDEN_TEMPLATE,
    NETWORK,
    PIPELINE_ACCOUNT,
    FakeStorage,
    FakeVertex,
    without_caching,
    write_config,
)
from tests.contract.sdk_config import use_fake

if TYPE_CHECKING:
    from retrain.config import Settings

pytestmark = pytest.mark.contract

GOLDEN: dict[str, Any] = yaml.safe_load(GOLDEN_TEMPLATE.read_text(encoding="utf-8"))
VIA = "pipeline_schedule"
SCHEDULED: dict[str, dict[str, Any] | None] = {
    "rainfall": {"schedule": {"cron": "0 3 * * *", "timezone": "Europe/Paris", "via": VIA}},
    "churn": {"data_prefix": "churn/", "schedule": {"cron": "30 1 * * 1", "via": VIA}},
    # Cloud Scheduler's (Terraform's): no pipeline schedule, or it would run twice per tick.
    "nightly": {"data_prefix": "nightly/", "schedule": {"cron": "0 2 * * *"}},
}
SCHEDULES = r"/schedules$"
ONE_SCHEDULE = r"/schedules/[^/]+$"


def scheduled_parameters(model: str, text: str) -> dict[str, Any]:
    """A scheduled job's parameters: no run id and no data (the steps then use the job's
    name and the model's data window)."""
    return {
        "model": model,
        "data_uris": [],
        "request_id": "",
        "reason": "schedule",
        "run_id": "",
        "config_yaml": text,
    }


# -- Vertex AI ---------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> tuple[Settings, str]:
    return write_config(tmp_path, "vertex", SCHEDULED)


@pytest.fixture
def storage(config: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStorage]:
    """The artifacts bucket with the templates that ``make deploy`` uploads."""
    settings, _ = config
    templates = {f"pipelines/{m}.yaml": GOLDEN_TEMPLATE.read_bytes() for m in settings.models}
    with FakeStorage({settings.buckets.artifacts: templates}) as fake:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake.url)
        yield fake


@pytest.fixture
def vertex(
    config: tuple[Settings, str], storage: FakeStorage, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeVertex]:
    """The fake, holding a stale schedule of ours and someone else's schedule, with the
    SDK pointed at it (over REST, anonymously, in a fresh global config of the SDK)."""
    settings, _ = config
    with FakeVertex(settings.project, settings.region) as fake:
        for display, labels in (("retrain-old", {"retrain_model": "old"}), ("export", {})):
            fake.seed_schedule(
                {
                    "displayName": display,
                    "cron": "TZ=UTC 0 1 * * *",
                    "maxConcurrentRunCount": "1",
                    "createPipelineJobRequest": {
                        "parent": fake.parent,
                        "pipelineJob": {"displayName": display, "labels": labels},
                    },
                }
            )
        use_fake(monkeypatch, fake.url, settings.project, settings.region)
        yield fake


def by_model(changes: list[Change]) -> dict[str, tuple[str, str]]:
    return {c.model: (c.action, c.cron) for c in changes}


def stored(vertex: FakeVertex, display_name: str) -> dict[str, Any]:
    (schedule,) = [s for s in vertex.schedules.values() if s["displayName"] == display_name]
    return schedule


def test_vertex_sync_creates_deletes_the_stale_and_then_leaves_alone(
    config: tuple[Settings, str], vertex: FakeVertex
) -> None:
    settings, text = config

    changes = sync_vertex_schedules(settings, text)

    assert by_model(changes) == {
        "rainfall": ("create", "TZ=Europe/Paris 0 3 * * *"),
        "churn": ("create", "TZ=UTC 30 1 * * 1"),
        "old": ("delete", "TZ=UTC 0 1 * * *"),
    }
    created = {r.body["displayName"]: r.body for r in vertex.received("POST", SCHEDULES)}
    assert sorted(created) == ["retrain-churn", "retrain-rainfall"]
    schedule = created["retrain-rainfall"]
    assert schedule["cron"] == "TZ=Europe/Paris 0 3 * * *"
    assert schedule["maxConcurrentRunCount"] == "1"  # an int64: a string in proto JSON
    assert "allowQueueing" not in schedule
    request = schedule["createPipelineJobRequest"]
    assert request["parent"] == vertex.parent
    job = request["pipelineJob"]
    assert job["serviceAccount"] == PIPELINE_ACCOUNT
    assert job["network"] == NETWORK
    assert job["runtimeConfig"] == {
        "gcsOutputDirectory": settings.pipeline_root,
        "parameterValues": scheduled_parameters("rainfall", text),
    }
    assert without_caching(job["pipelineSpec"]) == without_caching(GOLDEN)
    assert re.fullmatch(r"[0-9a-f]{16}", job["labels"]["retrain_spec"])
    assert job["labels"] == {
        "team": "forecasting",
        "retrain_model": "rainfall",
        "retrain_reason": "schedule",
        "retrain_spec": job["labels"]["retrain_spec"],
    }
    (deleted,) = vertex.received("DELETE", ONE_SCHEDULE)
    assert deleted.path.endswith("/schedules/1")  # the stale one; "export" is not ours
    assert sorted(s["displayName"] for s in vertex.schedules.values()) == [
        "export", "retrain-churn", "retrain-rainfall",
    ]  # fmt: skip

    writes = len(vertex.writes())
    again = sync_vertex_schedules(settings, text)

    assert {c.action for c in again} == {"unchanged"}
    assert by_model(again).keys() == {"rainfall", "churn"}
    assert len(vertex.writes()) == writes, "a second sync changes nothing"


def test_vertex_sync_puts_back_a_cron_edited_by_hand(
    config: tuple[Settings, str], vertex: FakeVertex
) -> None:
    settings, text = config
    sync_vertex_schedules(settings, text)
    stored(vertex, "retrain-rainfall")["cron"] = "TZ=UTC 0 5 * * *"  # edited in the console
    writes = len(vertex.writes())

    changes = sync_vertex_schedules(settings, text)

    assert by_model(changes)["rainfall"] == ("update", "TZ=Europe/Paris 0 3 * * *")
    assert by_model(changes)["churn"][0] == "unchanged"
    (patch,) = vertex.writes()[writes:]
    assert patch.method == "PATCH"
    assert set(str(patch.param("updateMask")).split(",")) == {"cron", "maxConcurrentRunCount"}
    assert stored(vertex, "retrain-rainfall")["cron"] == "TZ=Europe/Paris 0 3 * * *"


def test_vertex_sync_replaces_the_schedules_when_retrain_yaml_changes(
    config: tuple[Settings, str], vertex: FakeVertex
) -> None:
    settings, text = config
    sync_vertex_schedules(settings, text)
    old_names = {s["name"] for s in vertex.schedules.values()}
    writes = len(vertex.writes())
    edited = text + "\n# the gate was tightened\n"

    changes = sync_vertex_schedules(settings, edited)

    assert [c.action for c in changes] == ["update", "update"]
    assert all("replaced" in c.detail for c in changes)
    assert sorted(r.method for r in vertex.writes()[writes:]) == [
        "DELETE",
        "DELETE",
        "POST",
        "POST",
    ]
    job = stored(vertex, "retrain-churn")["createPipelineJobRequest"]["pipelineJob"]
    assert job["runtimeConfig"]["parameterValues"]["config_yaml"] == edited
    assert stored(vertex, "retrain-churn")["name"] not in old_names


def test_vertex_dry_run_lists_the_changes_and_makes_none(
    config: tuple[Settings, str], vertex: FakeVertex
) -> None:
    settings, text = config

    changes = sync_vertex_schedules(settings, text, dry_run=True)

    assert {c.action for c in changes} == {"create", "delete"}
    assert vertex.writes() == []


def test_cli_schedule_sync_prints_each_change(
    config: tuple[Settings, str], vertex: FakeVertex, tmp_path: Path
) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from retrain.cli import app  # noqa: PLC0415

    dry = CliRunner().invoke(
        app, ["schedule", "sync", "--dry-run", "--config", str(tmp_path / "retrain.yaml")]
    )
    assert dry.exit_code == 0, dry.output
    assert vertex.writes() == []
    lines = [" ".join(line.split()) for line in dry.output.splitlines()]
    assert "rainfall create TZ=Europe/Paris 0 3 * * *" in " | ".join(lines)
    assert any(line.startswith("old delete TZ=UTC 0 1 * * *") for line in lines)
    assert "(dry run: nothing changed)" in lines

    done = CliRunner().invoke(app, ["schedule", "sync", "--config", str(tmp_path / "retrain.yaml")])
    assert done.exit_code == 0, done.output
    assert len(vertex.received("POST", SCHEDULES)) == 2


def test_cli_schedule_sync_prints_json(
    config: tuple[Settings, str], vertex: FakeVertex, tmp_path: Path
) -> None:
    import json  # noqa: PLC0415

    from typer.testing import CliRunner  # noqa: PLC0415

    from retrain.cli import app  # noqa: PLC0415

    dry = CliRunner().invoke(
        app,
        ["schedule", "sync", "--dry-run", "-o", "json", "--config", str(tmp_path / "retrain.yaml")],
    )

    assert dry.exit_code == 0, dry.output
    listed = json.loads(dry.stdout)
    assert listed["dry_run"] is True
    assert {(c["model"], c["action"]) for c in listed["changes"]} == {
        ("rainfall", "create"), ("churn", "create"), ("old", "delete")
    }  # fmt: skip
    assert vertex.writes() == []


def test_cli_schedule_sync_refuses_the_local_backend(tmp_path: Path) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from retrain.cli import app  # noqa: PLC0415

    _, _ = write_config(tmp_path, "local")
    done = CliRunner().invoke(app, ["schedule", "sync", "--config", str(tmp_path / "retrain.yaml")])
    assert done.exit_code == 2
    assert "is for backend vertex or kfp" in " ".join(done.output.split())


# -- Kubeflow Pipelines ----------------------------------------------------------------------


@pytest.fixture
def kfp() -> Iterator[FakeKfp]:
    """The fake, whose experiment holds a stale recurring run of ours and someone else's."""
    with FakeKfp() as fake:
        experiment = fake.seed_experiment("retraining")
        for name in ("retrain-old", "nightly-export"):
            fake.seed_recurring_run(
                {
                    "display_name": name,
                    "experiment_id": experiment,
                    "trigger": {"cron_schedule": {"cron": "0 0 1 * * *"}},
                    "max_concurrency": "1",
                    "pipeline_spec": {"pipelineInfo": {"name": name}},
                }
            )
        yield fake


def kfp_config(directory: Path, kfp: FakeKfp, timezone: str = "UTC") -> tuple[Settings, str]:
    schedule = {"cron": "0 3 * * *", "timezone": timezone, "via": VIA}
    return write_config(
        directory,
        "kfp",
        {"rainfall": {"schedule": schedule}},
        kfp={"host": kfp.url, "experiment": "retraining"},
    )


def test_kfp_sync_creates_a_recurring_run_deletes_the_stale_and_then_leaves_alone(
    tmp_path: Path, kfp: FakeKfp
) -> None:
    settings, text = kfp_config(tmp_path, kfp)
    client = kfp_client(settings)

    def local(model: str) -> str:
        return str(GOLDEN_TEMPLATE)

    changes = sync_kfp_schedules(settings, text, client, template_for=local)

    assert by_model(changes) == {
        "rainfall": ("create", "0 0 3 * * *"),
        "old": ("delete", "0 0 1 * * *"),
    }
    (create,) = kfp.received("POST", r"/recurringruns$")
    body = create.body
    (experiment,) = kfp.experiments
    assert body["experiment_id"] == experiment
    assert body["display_name"] == "retrain-rainfall"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["max_concurrency"] == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["runtime_config"] == {
        "pipeline_root": settings.pipeline_root,
        "parameters": scheduled_parameters("rainfall", text),
    }
    assert without_caching(body["pipeline_spec"]) == without_caching(GOLDEN)
    (deleted,) = kfp.received("DELETE", r"/recurringruns/")
    assert sorted(r["display_name"] for r in kfp.recurring_runs.values()) == [
        "nightly-export", "retrain-rainfall",
    ]  # fmt: skip
    assert deleted.path.rpartition("/")[2] not in kfp.recurring_runs

    writes = len(kfp.writes())
    again = sync_kfp_schedules(settings, text, client, template_for=local)

    assert by_model(again) == {"rainfall": ("unchanged", "0 0 3 * * *")}
    assert len(kfp.writes()) == writes, "a second sync changes nothing"


def test_kfp_sync_refuses_a_time_zone_before_changing_anything(
    tmp_path: Path, kfp: FakeKfp
) -> None:
    settings, text = kfp_config(tmp_path, kfp, timezone="Europe/Paris")
    client = kfp_client(settings)
    seen = len(kfp.requests)

    with pytest.raises(
        ScheduleError, match=r"models\.rainfall\.schedule\.timezone: 'Europe/Paris'"
    ):
        sync_kfp_schedules(settings, text, client)

    assert len(kfp.requests) == seen
