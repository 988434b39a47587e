"""The Pub/Sub messages: round trips, and errors that name the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from retrain.messages import (
    Decision,
    EvaluatedModel,
    MessageError,
    MetricsReport,
    RetrainRequest,
    ScheduleMessage,
    decode,
    encode,
)

pytestmark = pytest.mark.unit

REQUEST = RetrainRequest(
    model="rainfall",
    reason="data",
    data_uris=["gs://retrain-data/rainfall/chunk-0001.csv"],
    dedupe_key="retrain-data/rainfall/chunk-0001.csv#1795608159085644",
    trigger_event_id="12345",
)


def test_round_trip_of_each_message() -> None:
    report = MetricsReport(
        model="rainfall",
        run_id="run-1",
        request_id=REQUEST.dedupe_key,
        reason=REQUEST.reason,
        status="succeeded",
        candidate=EvaluatedModel(artifact_uri="gs://a/m", metrics={"roc_auc": 0.81, "rows": 600}),
        champion=EvaluatedModel(artifact_uri="gs://a/c", version="3", metrics={"roc_auc": 0.79}),
        eval_data_uris=["gs://a/eval.parquet"],
        train_rows={"gs://retrain-data/rainfall/chunk-0001.csv": 2400},
    )
    decision = Decision(
        model="rainfall",
        run_id="run-1",
        verdict="promoted",
        reasons=["roc_auc 0.810 >= min 0.70: pass"],
        new_version="4",
        previous_champion="3",
    )
    for message in (REQUEST, report, decision):
        data = encode(message)
        assert json.loads(data)["schema_version"] == 1
        assert decode(type(message), data) == message


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"not json", "RetrainRequest: (message): Invalid JSON"),
        (b"[1, 2]", "RetrainRequest: (message): Input should be an object"),
        (
            b'{"model": "m", "reason": "data", "dedupe_key": "k", "trigger_event_id": "e", "x": 1}',
            "x: unknown field",
        ),
        (
            b'{"reason": "data", "dedupe_key": "k", "trigger_event_id": "e"}',
            "model: Field required",
        ),
        (
            b'{"model": "m", "reason": "whim", "dedupe_key": "k", "trigger_event_id": "e"}',
            "reason: Input should be 'data', 'drift', 'schedule' or 'manual'",
        ),
        (
            b'{"schema_version": 2, "model": "m", "reason": "data", "dedupe_key": "k", '
            b'"trigger_event_id": "e"}',
            "schema_version: Input should be 1",
        ),
    ],
)
def test_bad_requests_name_the_field(payload: bytes, problem: str) -> None:
    with pytest.raises(MessageError) as error:
        decode(RetrainRequest, payload)
    assert problem in str(error.value)


def test_failed_report_needs_its_error_and_oversized_payloads_are_refused() -> None:
    failed = {
        "model": "m",
        "run_id": "r",
        "request_id": "k",
        "reason": "data",
        "status": "failed",
    }
    with pytest.raises(MessageError, match="a failed report must carry the error"):
        decode(MetricsReport, json.dumps(failed).encode())
    failed["error"] = "train: estimator did not converge"
    assert decode(MetricsReport, json.dumps(failed).encode()).status == "failed"
    with pytest.raises(MessageError, match="over the 1000000 limit"):
        decode(RetrainRequest, b" " * 1_000_001)


def test_a_sweep_names_all_models_and_only_a_sweep_does() -> None:
    sweep = ScheduleMessage.model_validate({"model": "*", "reason": "sweep"})
    assert (sweep.model, sweep.reason) == ("*", "sweep")
    for bad in ({"model": "*"}, {"model": "rainfall", "reason": "sweep"}):
        with pytest.raises(ValidationError, match='model "\\*" goes with reason "sweep"'):
            ScheduleMessage.model_validate(bad)


def test_a_champion_carries_the_pointer_generation_it_was_read_at() -> None:
    """The gate finds a report stale by this generation (a rollback moves it too)."""
    champion = EvaluatedModel(artifact_uri="gs://r/c", version="3", metrics={}, generation=5)
    assert decode(EvaluatedModel, encode(champion)).generation == 5
    assert EvaluatedModel(artifact_uri="gs://r/c", metrics={}).generation is None
    with pytest.raises(ValidationError, match="generation"):
        EvaluatedModel(artifact_uri="gs://r/c", metrics={}, generation=-1)
