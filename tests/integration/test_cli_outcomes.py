"""Every outcome explained from the CLI (issue 14): `retrain runs` names a failed run's
step and error, `retrain versions` the runs that registered no version and the rows a
version trained on, every listing has ``--output json``, and piped tables are whole.

On the session stack's emulators: the gatekeeper decides in-process, as its function
does, on reports made here for models of each test's own, and the CLI reads what it kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from retrain.bus import PubsubBus
from retrain.cli import app
from retrain.config import Settings, load_settings
from retrain.gatekeeper.decisions import Gatekeeper
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger, new_run_id
from retrain.localstack import Stack
from retrain.messages import Decision, EvaluatedModel, MetricsReport, RetrainRequest
from tests.conftest import SHIPPED_MODEL, unique

pytestmark = pytest.mark.integration

# What preprocess said of a census export whose features are string codes (issue 14).
ERROR = (
    "column 'SCHL': rule non_numeric: a feature must be numeric, not category; "
    "list it under features or drop it\n"
    "the same for 'COW', 'MAR', 'OCCP', 'POBP', 'RELP', 'SEX' and 'RAC1P'"
)


@dataclass
class World:
    """A model of the test's own, in a retrain.yaml that names the session stack."""

    config: Path
    settings: Settings
    model: str
    ledger: FirestoreLedger
    gatekeeper: Gatekeeper
    gcs: Any

    def cli(self, *args: str, columns: int = 60) -> Result:
        """``retrain ARGS`` with its output piped, as under ``| cat``, and COLUMNS set
        narrow: piped, the width of the terminal must not matter."""
        return CliRunner().invoke(
            app, [*args, "--config", str(self.config)], env={"COLUMNS": str(columns)}
        )

    def launch(self) -> tuple[str, RetrainRequest]:
        """A run that the ledger launched, as the functions do: claimed, leased, started."""
        request = RetrainRequest(
            model=self.model, reason="data", data_uris=[f"gs://data/{self.model}/rows.csv"],
            dedupe_key=unique("key"), trigger_event_id=unique("event"),
        )  # fmt: skip
        assert self.ledger.claim(request) == "new"
        run_id = new_run_id(self.model)
        assert self.ledger.acquire(self.model, run_id, 600).acquired
        # (with the events of any run abandoned before: they wait again)
        collected = self.ledger.collect(self.model, run_id)
        assert request.dedupe_key in [r.dedupe_key for r in collected]
        self.ledger.start(self.model, run_id, request.data_uris)
        return run_id, request

    def decide(self, report: MetricsReport) -> Decision:
        decision = self.gatekeeper.report(report)
        assert isinstance(decision, Decision), decision
        return decision

    def fail(self, step: str = "preprocess-data", error: str = ERROR) -> str:
        run_id, request = self.launch()
        decision = self.decide(MetricsReport(
            model=self.model, run_id=run_id, request_id=request.dedupe_key, reason="data",
            status="failed", failed_step=step, error=error,
        ))  # fmt: skip
        assert decision.verdict == "rejected"
        return run_id

    def succeed(self, metrics: dict[str, float], **lineage: Any) -> str:
        """A run whose candidate the gate judges on ``metrics``. Its model folder holds no
        model: the tests here keep it from being served by failing the value thresholds."""
        run_id, request = self.launch()
        artifacts = self.gcs.bucket(self.settings.buckets.artifacts)
        artifacts.blob(f"runs/{self.model}/{run_id}/model/metadata.json").upload_from_string("{}")
        self.decide(MetricsReport(
            model=self.model, run_id=run_id, request_id=request.dedupe_key, reason="data",
            status="succeeded", train_data_uris=request.data_uris,
            candidate=EvaluatedModel(
                artifact_uri=f"{self.settings.run_prefix(self.model, run_id)}/model",
                metrics=metrics,
            ),
            **lineage,
        ))  # fmt: skip
        return run_id

    def quarantine(self, name: str, rule: str, columns: list[str], error: str) -> str:
        """An arrival whose check broke ``rule``, recorded as the arrival check does."""
        uri = f"gs://{self.settings.buckets.data}/{self.model}/{name}"
        arrival = RetrainRequest(
            model=self.model, reason="data", data_uris=[uri], dedupe_key=unique("key"),
            trigger_event_id=unique("event"),
        )  # fmt: skip
        assert self.ledger.record_arrival(
            arrival, "quarantined", rule=rule, columns=columns, error=error
        )
        return uri


# Below the shipped gate's roc_auc >= 0.70: rejected, never served.
WEAK = {"roc_auc": 0.6, "accuracy": 0.7, "log_loss": 0.6, "rows": 600.0}


@pytest.fixture
def world(
    stack: Stack,
    tmp_path: Path,
    ledger: FirestoreLedger,
    registry: FirestoreRegistry,
    publisher: Any,
    gcs: Any,
) -> World:
    model = unique("outcomes")
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    raw["models"] = {model: {**SHIPPED_MODEL, "data_prefix": f"{model}/", "schedule": None}}
    config = tmp_path / "retrain.yaml"  # same ports and state folder: the same stack
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    settings = load_settings(config)
    bus = PubsubBus(settings.project, publisher)
    return World(config, settings, model, ledger, Gatekeeper(settings, ledger, registry, bus), gcs)


def line_of(result: Result, text: str) -> str:
    found = [line for line in result.stdout.splitlines() if text in line]
    assert found, f"no line holds {text!r}:\n{result.stdout}"
    return found[0]


def test_runs_names_the_failing_step_and_error_on_one_line(world: World) -> None:
    run_id = world.fail()

    listed = world.cli("runs", world.model)

    assert listed.exit_code == 0, listed.output
    row = line_of(listed, run_id)  # the run id is whole, though COLUMNS is 60
    assert "failed in preprocess-data: column 'SCHL': rule non_numeric" in row
    assert row.rstrip().endswith("…"), "one line, cut: the error is longer than the table shows"
    assert "RAC1P" not in listed.stdout
    assert "`retrain runs --details` prints them whole" in listed.stdout

    detailed = world.cli("runs", world.model, "--details")

    assert detailed.exit_code == 0, detailed.output
    assert f"{run_id} ({world.model}): failed" in detailed.stdout
    for line in f"failed in preprocess-data: {ERROR}".splitlines():
        assert f"  {line}\n" in detailed.stdout


def test_runs_shows_the_gate_verdict_and_abandoned_runs(world: World) -> None:
    rejected = world.succeed(WEAK)
    abandoned, _ = world.launch()
    world.ledger.abandon(world.model, abandoned, "launch failed: RuntimeError: quota exceeded")

    listed = world.cli("runs", world.model, columns=250)

    assert listed.exit_code == 0, listed.output
    assert "rejected v1: roc_auc 0.600 >= min 0.700" in line_of(listed, rejected)
    assert "abandoned: launch failed: RuntimeError: quota exceeded" in line_of(listed, abandoned)


def test_versions_names_the_runs_that_registered_no_version(world: World) -> None:
    failed = world.fail()
    abandoned, _ = world.launch()
    world.ledger.abandon(world.model, abandoned, "launch failed: RuntimeError: quota exceeded")

    listed = world.cli("versions", world.model)

    assert listed.exit_code == 0, listed.output
    assert f"{world.model} has no versions yet" in listed.stdout
    assert "failed in preprocess-data: column 'SCHL': rule non_numeric" in line_of(listed, failed)
    assert "abandoned: launch failed: RuntimeError: quota exceeded" in line_of(listed, abandoned)

    rejected = world.succeed(WEAK)
    again = world.cli("versions", world.model, "--details")

    assert again.exit_code == 0, again.output
    assert f"v1 rejected (run {rejected}" in again.stdout
    assert "  - roc_auc 0.600 >= min 0.700: FAIL" in again.stdout
    assert rejected not in again.stdout.split("registered no version")[1]
    assert "    the same for 'COW', 'MAR'" in again.stdout  # --details: the whole error


def test_versions_says_the_rows_in_the_window_and_the_rows_trained_on(world: World) -> None:
    # One object of 4,000 rows; the window is the latest 3,000; its newest 600 evaluate.
    world.succeed(WEAK, train_rows={"gs://data/rows.csv": 4000}, window_rows=3000, fit_rows=2400)

    listed = world.cli("versions", world.model)

    assert listed.exit_code == 0, listed.output
    assert (
        "trained on 2,400 of the window's 3,000 rows (600 held out for evaluation); "
        "read 4,000 rows from 1 object(s)"
    ) in listed.stdout
    as_json = json.loads(world.cli("versions", world.model, "-o", "json").stdout)
    (version,) = as_json["versions"]
    assert version["rows"] == {"read": 4000, "window": 3000, "trained": 2400, "evaluated": 600}


def test_every_listing_prints_json(world: World, stack: Stack) -> None:
    failed = world.fail()
    rejected = world.succeed(WEAK)
    held = world.quarantine("codes.csv", "non_numeric", ["SCHL"], ERROR)

    runs = world.cli("runs", world.model, "--output", "json")
    versions = world.cli("versions", world.model, "-o", "json")
    quarantined = world.cli("quarantine", world.model, "-o", "json")
    status = world.cli("status", "-o", "json")

    for result in (runs, versions, quarantined, status):
        assert result.exit_code == 0, result.output
    by_id = {run["run_id"]: run for run in json.loads(runs.stdout)}
    assert list(by_id) == [failed, rejected]
    assert by_id[failed]["state"] == "failed"
    assert by_id[failed]["failed_step"] == "preprocess-data"
    assert by_id[failed]["error"] == ERROR
    assert by_id[failed]["verdict"] == "rejected"
    assert by_id[rejected]["state"] == "succeeded"
    assert by_id[rejected]["version"] == "1"
    assert "roc_auc 0.600 >= min 0.700: FAIL" in by_id[rejected]["reasons"]
    listed = json.loads(versions.stdout)
    assert [v["version"] for v in listed["versions"]] == ["1"]
    assert [r["run_id"] for r in listed["runs_without_version"]] == [failed]
    assert listed["champion"] is None
    (entry,) = json.loads(quarantined.stdout)
    assert (entry["object"], entry["rule"], entry["columns"]) == (held, "non_numeric", ["SCHL"])
    parts = json.loads(status.stdout)["parts"]
    assert {part["name"] for part in parts} == {part.name for part in stack.status()}
    assert all(part["healthy"] for part in parts)


def test_piped_tables_are_whole_at_any_width(world: World, stack: Stack) -> None:
    run_id = world.fail(error="short")
    long_name = world.quarantine(
        "x" * 80 + ".csv", "too_few_rows", [], "3 rows, fewer than min_object_rows 20"
    )

    runs = world.cli("runs", world.model, columns=30)
    quarantined = world.cli("quarantine", world.model, columns=30)
    status = world.cli("status", columns=30)

    assert "failed in preprocess-data: short" in line_of(runs, run_id)
    assert "3 rows, fewer than min_object_rows 20" in line_of(quarantined, long_name)
    for part in stack.status():
        assert part.url in line_of(status, part.name)
    assert "…" not in runs.stdout + quarantined.stdout + status.stdout
