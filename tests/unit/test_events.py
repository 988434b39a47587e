"""Decoding Pub/Sub CloudEvents, in-process and through functions-framework's test client."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from functions_framework import create_app

from retrain.events import PUBLISHED, EventError, decode_pubsub

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "test_data"
TRIGGERS = Path(__file__).resolve().parents[2] / "triggers" / "main.py"


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


@pytest.mark.parametrize("function", ["on_data_arrival", "on_drift", "on_schedule", "gatekeeper"])
def test_each_function_logs_the_decoded_event(
    function: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = create_app(function, str(TRIGGERS), "cloudevent").test_client()
    event = event_fixture("gcs_finalize_pubsub.json")
    response = client.post(
        "/", json=event, headers={"Content-Type": "application/cloudevents+json"}
    )
    assert response.status_code == 200
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {
        "severity": "INFO",
        "function": function,
        "event_id": "12345",
        "topic": "data-arrivals",
        "message_id": "12345",
        "attributes": event["data"]["message"]["attributes"],
        "size": len(base64.b64decode(event["data"]["message"]["data"])),
    }


def test_function_acks_a_malformed_event_with_one_error_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = create_app("on_drift", str(TRIGGERS), "cloudevent").test_client()
    event = event_fixture("gcs_finalize_pubsub.json")
    event["data"]["message"]["data"] = "%%%"
    response = client.post(
        "/", json=event, headers={"Content-Type": "application/cloudevents+json"}
    )
    assert response.status_code == 200  # acked: redelivery would never succeed
    (line,) = capsys.readouterr().out.strip().splitlines()
    logged = json.loads(line)
    assert logged["severity"] == "ERROR"
    assert "not valid base64" in logged["error"]
