"""retrain.monitoring without services: windows, labels, the join, live metrics, degradation,
and the monitor's schedule message."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score
from typer.testing import CliRunner

from retrain.cli import app
from retrain.config import load_settings
from retrain.events import EventError, PubsubMessage
from retrain.messages import ScheduleMessage, decode
from retrain.monitoring import (
    LATE_SECONDS,
    LabelError,
    MonitorPass,
    class_index,
    complete_windows,
    degradation_reasons,
    live_metrics,
    parse_labels,
    served_frame,
    window_id,
    window_of,
)
from retrain.predictions import PredictionRecord
from retrain.scheduler import MonitorJob, jobs, monitor_job, schedule_message
from retrain.service import RetrainService
from tests.conftest import ROOT, write_config

pytestmark = pytest.mark.unit


def record(
    request_id: str, at: float, version: str, scores: list[float], labels: list[int] | None = None
) -> PredictionRecord:
    return PredictionRecord(
        request_id=request_id, time=at, model="m", version=version,
        instances=[[0.0, 1.0]] * len(scores), scores=scores, labels=labels or [],
    )  # fmt: skip


# -- windows ----------------------------------------------------------------


def test_windows_are_aligned_to_the_epoch_and_complete_only_once_late_writers_flushed() -> None:
    assert window_of(3725.0, 3600) == (3600.0, 7200.0)
    assert window_of(3600.0, 3600) == (3600.0, 7200.0)  # a window holds its start
    assert window_of(3599.999, 3600) == (0.0, 3600.0)
    assert window_id(7200.0) == "000000007200"
    assert window_id(1796053500.0) == "001796053500"
    assert len(window_id(1796053500.0)) == 12

    # From the window holding `first`, each window whose end is LATE_SECONDS behind now.
    found = complete_windows(first=130.0, now=600.0 + LATE_SECONDS, seconds=60)
    assert found[0] == (120.0, 180.0)
    assert found[-1] == (540.0, 600.0)
    assert len(found) == 8
    assert complete_windows(first=130.0, now=600.0 + LATE_SECONDS - 0.001, seconds=60)[-1] == (
        480.0,
        540.0,
    )
    assert complete_windows(first=130.0, now=170.0, seconds=60) == []


# -- labels ----------------------------------------------------------------


def test_labels_csv_and_json_lines_join_by_request_id_and_index() -> None:
    csv = b"request_id,label,index\nr1,1,0\nr1,0,1\nr2,1,\n"
    assert parse_labels(csv, "labels.csv") == {("r1", 0): "1", ("r1", 1): "0", ("r2", 0): "1"}
    no_index = b"\xef\xbb\xbfrequest_id,label\nr3,0\n"  # a BOM, as spreadsheets write
    assert parse_labels(no_index, "x.csv") == {("r3", 0): "0"}
    lines = b'{"request_id": "r1", "label": 1}\n\n{"request_id": 7, "label": 0, "index": 2}\n'
    assert parse_labels(lines, "x.jsonl") == {("r1", 0): 1, ("7", 2): 0}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"id,label\nr1,1\n",
            r"x: the header \['id', 'label'\] lacks column\(s\) \['request_id'\]",
        ),
        (b"request_id,label\nr1,1\n,0\n", "x, row 3: field 'request_id' is missing or empty"),
        (b"request_id,label\nr1,\n", "x, row 2: field 'label' is missing or empty"),
        (b"request_id,label,index\nr1,1,two\n", "x, row 2: field 'index' must be a whole number"),
        (b"request_id,label,index\nr1,1,-1\n", "x, row 2: field 'index' must be .* not -1"),
        (b'{"request_id": "r1", "label": 1}\n{"request_id": "r2"', "x, line 2: not JSON"),
        (b'{"request_id": "r1"}\n', "x, row 1: field 'label' is missing or empty"),
    ],
)
def test_a_bad_labels_file_names_the_row_and_the_field(data: bytes, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        parse_labels(data, "x")


def test_a_label_is_matched_to_the_models_classes_as_value_text_or_number() -> None:
    assert class_index(1, [0, 1]) == 1
    assert class_index("1", [0, 1]) == 1
    assert class_index("0.0", [0, 1]) == 0
    assert class_index(True, [0, 1]) == 1
    assert class_index("yes", ["no", "yes"]) == 1
    assert class_index("maybe", ["no", "yes"]) is None
    assert class_index("2", [0, 1]) is None


# -- what was served ----------------------------------------------------------------


def test_served_instances_become_rows_from_lists_in_feature_order_or_objects_by_name() -> None:
    records = [
        PredictionRecord("a", 1.0, "m", "1", [[1.0, 2.0], [3.0, 4.0]], [0.1, 0.2]),
        PredictionRecord("b", 2.0, "m", "1", [{"y": 6.0, "x": 5.0, "extra": 0}], [0.3]),
        PredictionRecord("c", 3.0, "m", "1", [{"x": 7.0}], [0.4]),
    ]
    frame = served_frame(records, ["x", "y"])
    assert list(frame.columns) == ["x", "y"]
    assert frame["x"].tolist() == [1.0, 3.0, 5.0, 7.0]
    assert frame["y"].tolist()[:3] == [2.0, 4.0, 6.0]
    assert np.isnan(frame["y"].iloc[3])  # a missing feature is null (drift leaves it out)

    with pytest.raises(ValueError, match="request d, instance 0: expected a list of 2 values"):
        served_frame([PredictionRecord("d", 1.0, "m", "1", [[1.0]], [0.5])], ["x", "y"])


def test_live_metrics_per_version_match_sklearn_on_the_joined_rows() -> None:
    rng = np.random.default_rng(7)
    records, labels = [], {}
    truth: dict[str, list[int]] = {"1": [], "2": []}
    scores: dict[str, list[float]] = {"1": [], "2": []}
    for n in range(300):
        version = "1" if n % 3 else "2"
        pair = rng.random(2).round(4).tolist()
        records.append(record(f"r{n}", float(n), version, pair))
        for index, score in enumerate(pair):
            if (n + index) % 4 == 0:
                continue  # its label has not arrived
            actual = int(rng.random() < (score if version == "1" else 0.5))
            labels[(f"r{n}", index)] = str(actual)  # as a CSV gives it
            truth[version].append(actual)
            scores[version].append(score)
    labels[("never-logged", 0)] = "1"  # waits for its prediction; joins nothing

    live = live_metrics(records, labels, [0, 1])

    for version in ("1", "2"):
        predicted = [int(s >= 0.5) for s in scores[version]]
        assert live[version]["served"] == 2 * sum(r.version == version for r in records)
        assert live[version]["labelled"] == len(truth[version])
        assert live[version]["accuracy"] == pytest.approx(accuracy_score(truth[version], predicted))
        assert live[version]["roc_auc"] == pytest.approx(
            roc_auc_score(truth[version], scores[version])
        )
    assert live["1"]["roc_auc"] > 0.7 > live["2"]["roc_auc"]


def test_accuracy_uses_the_predicted_class_when_logged_and_roc_auc_needs_both_classes() -> None:
    # The server said class 0 although the score is 0.9 (another threshold): its word counts.
    records = [record("a", 1.0, "1", [0.9, 0.2], labels=[0, 0]), record("b", 2.0, "1", [0.7])]
    labels = {("a", 0): 1, ("a", 1): 1, ("b", 0): 1, ("c", 0): "unknown class"}

    live = live_metrics(records, labels, [0, 1], versions=["1", "9"])

    assert live["1"] == {"served": 3, "labelled": 3, "accuracy": pytest.approx(1 / 3)}
    assert live["9"] == {"served": 0, "labelled": 0}  # listed, served nothing


def test_labels_that_name_neither_class_are_counted_not_joined() -> None:
    records = [record("a", 1.0, "1", [0.9, 0.2]), record("b", 2.0, "1", [0.7])]
    labels = {("a", 0): "True", ("a", 1): "False", ("b", 0): 1}  # True is not the class 1

    live = live_metrics(records, labels, [0, 1])

    assert live["1"] == {"served": 3, "labelled": 1, "foreign": 2, "accuracy": 1.0}


def test_degradation_needs_enough_labels_and_a_drop_beyond_the_margin() -> None:
    live = {
        "1": {"served": 500, "labelled": 200, "accuracy": 0.70, "roc_auc": 0.80},
        "2": {"served": 500, "labelled": 50, "accuracy": 0.10, "roc_auc": 0.10},
        "3": {"served": 500, "labelled": 400, "accuracy": 0.84},
    }
    evaluated = {"1": {"accuracy": 0.80, "roc_auc": 0.83}, "2": {"accuracy": 0.80}}

    reasons = degradation_reasons(live, evaluated, margin=0.05, min_labelled=100)

    # v1's accuracy fell 0.10 (> 0.05); its roc_auc 0.03 (within). v2 has too few labels;
    # v3 has no evaluation figures.
    assert reasons == ["v1 live accuracy 0.7000 < evaluation 0.8000 - 0.05 (200 labelled)"]
    assert degradation_reasons(live, evaluated, margin=0.2, min_labelled=100) == []


# -- the schedule ----------------------------------------------------------------


def test_the_monitor_runs_every_monitor_seconds_with_its_own_message() -> None:
    settings = load_settings(ROOT / "retrain.yaml")
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    job = monitor_job(settings, now)
    assert isinstance(job, MonitorJob)
    assert job.model == "*"
    assert job.next == now + timedelta(seconds=settings.monitor_seconds)
    assert job.advance() == now + timedelta(seconds=settings.monitor_seconds)
    message = schedule_message(job.model, job.next, job.reason)
    assert json.loads(message) == {"model": "*", "reason": "monitor"}
    assert decode(ScheduleMessage, message).reason == "monitor"
    assert all(not isinstance(j, MonitorJob) for j in jobs(settings, now))  # its own job

    with pytest.raises(ValueError, match='"monitor"'):
        ScheduleMessage(model="rainfall", reason="monitor")


# -- the service's pass -----------------------------------------------------------------------


class _Monitor:
    """Stands in for the Monitor (its own tests are in tests/integration): one model fails."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    def check(self, model: str) -> MonitorPass:
        self.checked.append(model)
        if model == "broken":
            raise RuntimeError("the store did not answer")
        found = MonitorPass(model, windows=[{"drifted": True}, {"drifted": False}])
        found.alerts.append({"kind": "serving_drift", "key": f"k-{model}", "message_id": "7"})
        return found


def test_a_monitor_message_runs_one_pass_over_every_model_and_a_failure_stops_none() -> None:
    shipped = load_settings(ROOT / "retrain.yaml")
    spec = shipped.models["rainfall"]
    settings = shipped.model_copy(update={"models": {"broken": spec, "rainfall": spec}})
    service = RetrainService(settings, None, SimpleNamespace(scheduled=None), None, None)  # type: ignore[arg-type]
    monitor = _Monitor()
    service._monitor = monitor  # type: ignore[assignment]
    message = PubsubMessage("m1", json.dumps({"model": "*", "reason": "monitor"}).encode())

    outcome = service.schedule(message)

    assert monitor.checked == ["broken", "rainfall"]
    assert outcome.action == "checked"
    assert outcome.detail == (
        "monitor: broken: failed: RuntimeError: the store did not answer; "
        "rainfall: 2 window(s) checked, 1 drifted, 1 alert(s) published of 1 raised"
    )
    assert outcome.extra == {"alerts": {"rainfall": ["k-rainfall"]}}
    with pytest.raises(EventError, match=r"'nope' is not in retrain\.yaml"):
        service.monitor(["nope"])


# -- the commands -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "lines", "message"),
    [
        (["rainfall"], None, "give MODEL and FILE"),
        (["nope", "{file}"], "request_id,label\nr1,1\n", "'nope' is not a model"),
        (["rainfall", "{file}"], "request_id,label,index\nr1,1,0\nr2,0,x\n",
         "row 3: field 'index' must be a whole number >= 0, not 'x'"),
        (["rainfall", "{file}"], "id,label\nr1,1\n", "lacks column(s) ['request_id']"),
        (["rainfall", "{file}"], "request_id,label\n", "no labels"),
        (["rainfall", "{tmp}/absent.csv"], None, "absent.csv is not a file"),
    ],
)  # fmt: skip
def test_publish_labels_refuses_a_bad_file_naming_the_row_and_field_before_any_upload(
    tmp_path: Path, args: list[str], lines: str | None, message: str
) -> None:
    config = write_config(tmp_path)
    file = tmp_path / "labels.csv"
    if lines is not None:
        file.write_text(lines, encoding="utf-8")
    given = [a.format(file=file, tmp=tmp_path) for a in args]
    env = {"COLUMNS": "400", "RETRAIN_OPERATOR": "test"}

    result = CliRunner().invoke(
        app, ["publish", "labels", *given, "--config", str(config)], env=env
    )

    assert result.exit_code == 2, result.output
    # (rich wraps standard error at its own width, anywhere in a path)
    assert "".join(message.split()) in "".join(result.output.split()), result.output


def test_publish_other_kinds_still_need_a_model_and_take_no_file(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    runner = CliRunner()

    missing = runner.invoke(app, ["publish", "schedule", "--config", str(config)])
    extra = runner.invoke(app, ["publish", "drift", "x.csv", "-m", "rainfall", "-c", str(config)])

    assert missing.exit_code == 2
    assert "schedule needs --model" in missing.output
    assert extra.exit_code == 2
    assert "drift takes no MODEL FILE arguments" in extra.output
