"""Decoding Pub/Sub CloudEvents, in-process and through functions-framework's test client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from functions_framework import create_app

from retrain.events import FINALIZED, PUBLISHED, EventError, decode_pubsub, object_event

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "test_data"
ROOT = Path(__file__).resolve().parents[2]
TRIGGERS = ROOT / "triggers" / "main.py"


def event_fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return loaded


def test_decodes_gcs_notification_wrapped_in_pubsub() -> None:
    event = event_fixture("gcs_finalize_pubsub.json")
    message = decode_pubsub(event["type"], event["source"], event["data"])
    assert message.message_id == "12345"
    assert message.topic == "data-arrivals"
    assert message.delivery_attempt == 2
    assert message.attributes["objectId"] == "rainfall/chunk-0001.csv"
    assert json.loads(message.data)["generation"] == "1795608159085644"


@pytest.mark.parametrize(
    ("size", "expected"),
    [("8", 8), (8, 8), ("0", 0), (None, None), ("-1", None), ("8.5", None), (True, None),
     ("9" * 25, None)],
)  # fmt: skip
def test_the_notified_size_is_kept_when_it_is_a_size(size: Any, expected: int | None) -> None:
    event = event_fixture("gcs_finalize_pubsub.json")
    payload = {"bucket": "retrain-data", "name": "rainfall/chunk-0001.csv", "generation": "1"}
    if size is not None:
        payload["size"] = size
    event["data"]["message"]["data"] = base64.b64encode(json.dumps(payload).encode()).decode()
    decoded = object_event(event["type"], event["source"], event["id"], event["data"])
    assert decoded.size == expected
    direct = object_event(FINALIZED, "src", "e-1", payload)
    assert direct.size == expected
    assert decoded.dedupe_key == "retrain-data/rainfall/chunk-0001.csv#1795608159085644"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({}, "no 'message' object"),
        ({"message": "x"}, "no 'message' object"),
        ({"message": {"data": "aGk="}}, "no messageId"),
        ({"message": {"messageId": "1", "data": "not base64!"}}, "not valid base64"),
        ({"message": {"messageId": "1", "data": 5}}, "not a base64 string"),
        ({"message": {"messageId": "1", "attributes": {"a": 1}}}, "not a map of strings"),
    ],
)
def test_malformed_messages_name_the_problem(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(EventError, match=problem):
        decode_pubsub(PUBLISHED, "//pubsub.googleapis.com/projects/p/topics/t", data)


def test_other_event_types_are_refused() -> None:
    with pytest.raises(EventError, match=r"is not google\.cloud\.pubsub"):
        decode_pubsub("google.cloud.storage.object.v1.finalized", "src", {"message": {}})


SHIPPED = Path(__file__).resolve().parents[2] / "retrain.yaml"


# Nothing listens here: the functions build their Firestore client at cold start (no call
# is made until the ledger or the registry is used), and any use of it would fail the test.
NO_FIRESTORE = "127.0.0.1:1"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A function's app, in-process; these events never need the ledger or the bus."""
    monkeypatch.setenv("RETRAIN_CONFIG", str(SHIPPED))
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", NO_FIRESTORE)

    def make(function: str) -> Any:
        return create_app(function, str(TRIGGERS), "cloudevent").test_client()

    return make


def post(client: Any, event: dict[str, Any]) -> Any:
    return client.post("/", json=event, headers={"Content-Type": "application/cloudevents+json"})


def logged(capfd: pytest.CaptureFixture[str]) -> dict[str, Any]:
    (line,) = capfd.readouterr().out.strip().splitlines()
    value: dict[str, Any] = json.loads(line)
    return value


@pytest.mark.parametrize(
    ("attributes", "why"),
    [
        ({"objectId": "elsewhere/x.csv"}, "belongs to no model's data prefix"),
        ({"bucketId": "another-bucket"}, "belongs to no model's data prefix"),
        ({"objectId": "rainfall/folder/"}, "is a folder"),
        ({"eventType": "OBJECT_DELETE"}, "is not a finalize"),
        ({"objectId": "gcloud/tmp/parallel_composite_uploads/x"}, "gcloud temporary object"),
    ],
)
def test_objects_that_start_no_run_are_ignored_with_one_line(
    client: Any, capfd: pytest.CaptureFixture[str], attributes: dict[str, str], why: str
) -> None:
    event = event_fixture("gcs_finalize_pubsub.json")
    event["data"]["message"]["attributes"].update(attributes)
    event["data"]["message"]["data"] = ""
    assert post(client("on_data_arrival"), event).status_code == 200
    line = logged(capfd)
    assert line["action"] == "ignored"
    assert why in line["detail"]


@pytest.mark.parametrize(
    ("function", "change", "problem"),
    [
        ("on_data_arrival", {"data": "%%%"}, "not valid base64"),
        ("on_data_arrival", {"attributes": {"objectId": "rainfall/../x.csv", "bucketId": "b",
                                            "objectGeneration": "1"}}, "not a safe object name"),
        ("on_data_arrival", {"attributes": {"objectId": "rainfall/a\x07.csv", "bucketId": "b",
                                            "objectGeneration": "1"}}, "not a safe object name"),
        ("on_schedule", {"data": base64.b64encode(b"[1, 2]").decode()}, "JSON but not an object"),
        ("on_schedule", {"data": base64.b64encode(b"{nope").decode()}, "data is not JSON"),
        ("on_schedule", {"data": base64.b64encode(b'{"model": "rainfall", "x": 1}').decode()},
         "Extra inputs are not permitted"),
        ("on_schedule", {"data": base64.b64encode(b'{"cron": "daily"}').decode()},
         "model\n  Field required"),
        ("on_schedule", {"data": base64.b64encode(b'{"model": "nope"}').decode()},
         "model 'nope' is not in retrain.yaml"),
        ("on_drift", {"data": base64.b64encode(b" " * 1_000_001).decode()}, "over the 1000000"),
        ("on_drift", {"data": base64.b64encode(b'{"incident": {"summary": "x"}}').decode()},
         "no policy user label 'retrain_model'"),
    ],
)  # fmt: skip
def test_bad_input_is_logged_once_and_acked(
    client: Any,
    capfd: pytest.CaptureFixture[str],
    function: str,
    change: dict[str, Any],
    problem: str,
) -> None:
    event = event_fixture("gcs_finalize_pubsub.json")
    event["data"]["message"].update(change)
    response = post(client(function), event)
    assert response.status_code == 200  # acked: redelivery would never succeed
    line = logged(capfd)
    assert line["severity"] == "ERROR"
    assert problem in line["error"]


def test_a_report_that_fails_its_schema_is_not_acked(
    client: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    event = event_fixture("gcs_finalize_pubsub.json")
    event["data"]["message"]["data"] = base64.b64encode(b'{"model": "rainfall"}').decode()
    response = post(client("gatekeeper"), event)
    assert response.status_code == 500  # retried, then dead-lettered; the champion untouched
    line = json.loads(capfd.readouterr().out.strip().splitlines()[0])
    assert line["severity"] == "ERROR"
    assert "MetricsReport: run_id: Field required" in line["error"]


def test_a_closed_monitoring_incident_starts_nothing(
    client: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    event = event_fixture("gcs_finalize_pubsub.json")
    incident = {"incident": {"incident_id": "i-1", "state": "closed",
                             "policy_user_labels": {"retrain_model": "rainfall"}}}  # fmt: skip
    event["data"]["message"]["data"] = base64.b64encode(json.dumps(incident).encode()).decode()
    assert post(client("on_drift"), event).status_code == 200
    line = logged(capfd)
    assert line["action"] == "ignored"
    assert "incident i-1 closed" in line["detail"]


def test_log_lines_of_concurrent_handlers_are_never_joined() -> None:
    """Cloud Logging parses one JSON object per line: lines written by threads at once must
    come out whole (print() writes the text and its newline separately), also while
    functions-framework swaps sys.stdout per request (LOG_EXECUTION_ID: its wrapper wrote a
    line and its newline apart, and lines came out joined)."""
    code = """
import contextlib, sys, threading
sys.path.insert(0, sys.argv[1])
from functions_framework import execution_id
from triggers import main
def burst(n):
    for i in range(400):
        execution_id._set_current_context(execution_id.ExecutionContext(f"x-{n}", "s"))
        with contextlib.redirect_stdout(execution_id.LoggingHandlerAddExecutionId(sys.stdout)):
            main._log("INFO", "on_data_arrival", object=f"gs://b/{n}/{i}.csv", detail="x" * 200)
threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
for t in threads: t.start()
for t in threads: t.join()
"""
    env = {**os.environ, "RETRAIN_CONFIG": str(SHIPPED), "FIRESTORE_EMULATOR_HOST": NO_FIRESTORE}
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True,
                          text=True, timeout=120, check=True, env=env)  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == 8 * 400
    assert all(json.loads(line)["function"] == "on_data_arrival" for line in lines)
