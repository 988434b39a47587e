"""The CLI explains every outcome (issue 14), the parts that need no service: the gate's
whole summary in `retrain config check`, whole lines when piped, `status --output json`,
and how a run's outcome is put in words (:mod:`retrain.outcomes`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from retrain.cli import app
from retrain.ledger import RunRecord
from retrain.outcomes import RunOutcome, one_line
from tests import penguins
from tests.conftest import write_config

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).parents[2] / "retrain.yaml"


def piped(*args: str, columns: int = 40) -> Result:
    """``retrain ARGS`` with its output piped (CliRunner's is no terminal), COLUMNS narrow."""
    env: dict[str, str | None] = {"RETRAIN_CONFIG": None, "COLUMNS": str(columns)}
    return CliRunner().invoke(app, list(args), env=env)


def test_config_check_summarises_every_rule_of_the_gate() -> None:
    checked = piped("config", "check", str(SHIPPED))

    assert checked.exit_code == 0, checked.output
    lines = [" ".join(line.split()) for line in checked.stdout.splitlines()]
    assert "gate primary roc_auc; roc_auc >= 0.7, accuracy >= 0.65; min 200 eval rows" in lines
    assert "min_improvement absolute 0: roc_auc strictly better than the champion's" in lines
    assert "max_regression accuracy at most 0.02 worse than the champion's" in lines
    assert "on_schema_change hold" in lines


def test_config_check_relative_improvement_and_no_regression_bound(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    text = text.replace("absolute: 0.0 ", "relative: 0.01").replace(
        "      max_regression:\n        accuracy: 0.02\n", ""
    )
    path = tmp_path / "retrain.yaml"
    path.write_text(text, encoding="utf-8")

    checked = piped("config", "check", str(path))

    assert checked.exit_code == 0, checked.output
    lines = [" ".join(line.split()) for line in checked.stdout.splitlines()]
    assert (
        "min_improvement relative 0.01: roc_auc at least 1.00% better than the champion's" in lines
    )
    assert "max_regression none (other metrics may get worse)" in lines


def test_config_check_shows_feature_types_excluded_columns_and_threads(tmp_path: Path) -> None:
    path = write_config(tmp_path, models={"penguins": {**penguins.CONFIG, "threads": 1}})

    checked = piped("config", "check", str(path))

    assert checked.exit_code == 0, checked.output
    lines = [" ".join(line.split()) for line in checked.stdout.splitlines()]
    assert "categorical Species, Island, Clutch Completion" in lines
    assert "excluded studyName, Sample Number, Region, Stage, Individual ID, Comments" in lines
    assert "unlabelled drop rows without a label" in lines
    assert "threads 1" in lines


def test_piped_output_is_never_wrapped_or_cut() -> None:
    checked = piped("config", "check", str(SHIPPED), columns=30)

    assert checked.exit_code == 0, checked.output
    lines = [" ".join(line.split()) for line in checked.stdout.splitlines()]
    assert (
        "topics: data-arrivals, drift-alerts, retrain-schedule, model-metrics, model-decisions"
        in lines
    )
    assert (
        "estimator HistGradientBoostingClassifier {'max_iter': 200, 'learning_rate': 0.1}" in lines
    )
    assert "…" not in checked.stdout


def test_status_json_without_a_stack(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    listed = piped("status", "--config", str(config), "--output", "json")

    assert listed.exit_code == 1, "exit 1: no part is healthy"
    assert json.loads(listed.stdout) == {
        "state_dir": str(tmp_path / "state"),
        "supervisor": False,
        "parts": [],
    }


def test_an_unknown_output_format_is_refused(tmp_path: Path) -> None:
    listed = piped("status", "--config", str(write_config(tmp_path)), "-o", "yaml", columns=200)

    assert listed.exit_code == 2
    assert "'yaml' is not one of 'table', 'json'" in " ".join(listed.output.split())


def outcome(state: str, **fields: object) -> RunOutcome:
    """A run in ``state`` with the ledger's ``fields``, and the gate's ``decision`` if any."""
    decision = fields.pop("decision", None)
    assert decision is None or isinstance(decision, dict)
    record = RunRecord.from_dict({"model": "m", "run_id": "m-1", "state": state,
                                  "created_at": 100.0, "started_at": 101.0, **fields})  # fmt: skip
    return RunOutcome.of(record, decision)


@pytest.mark.parametrize(
    ("state", "fields", "why"),
    [
        ("failed", {"failed_step": "train-model", "error": "MemoryError"},
         "failed in train-model: MemoryError"),
        # Ended before the ledger kept the step: the gate's reason names it.
        ("failed", {"error": "boom", "decision": {"verdict": "rejected", "reasons": [
            "the run failed in evaluate-model: boom: FAIL"]}},
         "the run failed in evaluate-model: boom"),
        ("failed", {"error": "boom"}, "failed: boom"),
        ("abandoned", {"error": "launch failed: quota"}, "abandoned: launch failed: quota"),
        ("succeeded", {"ended_at": 110.0, "decision": {
            "verdict": "rejected", "new_version": "4",
            "reasons": ["roc_auc 0.812 >= min 0.700: pass",
                        "no improvement over v3: roc_auc +0.0000: FAIL"]}},
         "rejected v4: no improvement over v3: roc_auc +0.0000"),
        ("succeeded", {"ended_at": 110.0, "decision": {"verdict": "promoted", "new_version": "5",
                                                       "reasons": ["x: pass"]}},
         "promoted v5"),
        ("succeeded", {"ended_at": 110.0},
         "ended; the gatekeeper has not decided on its report"),
        ("running", {}, ""),
    ],
)  # fmt: skip
def test_why_a_run_ended(state: str, fields: dict[str, object], why: str) -> None:
    assert outcome(state, **fields).why == why


def test_outcome_json_and_duration() -> None:
    found = outcome("failed", failed_step="preprocess-data", error="bad\nrows", ended_at=103.5)

    assert found.seconds == 2.5
    as_json = found.to_json()
    assert as_json["failed_step"] == "preprocess-data"
    assert as_json["error"] == "bad\nrows"
    assert as_json["why"] == "failed in preprocess-data: bad\nrows"
    assert as_json["started"] == "1970-01-01T00:01:41+00:00"


def test_one_line() -> None:
    assert one_line("a\n  b\tc", 10) == "a b c"
    assert one_line("x" * 20, 10) == "x" * 9 + "…"
    assert len(one_line("word " * 50, 120)) == 120
