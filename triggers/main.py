"""Cloud Function entry points (CloudEvent signature), one per topic.

Each function decodes its event and hands it to the core. Until the triggers and
gatekeeper issues land, the core step is to log the decoded event as one structured
line, so that the event flow can be followed in the logs.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import functions_framework
from cloudevents.http.event import CloudEvent

from retrain.events import EventError, decode_pubsub


def _log(severity: str, function: str, **fields: Any) -> None:
    # Cloud Functions turns one JSON line on stdout into one structured log entry.
    print(  # noqa: T201
        json.dumps({"severity": severity, "function": function, **fields}),
        file=sys.stdout,
        flush=True,
    )


def _received(function: str, event: CloudEvent) -> None:
    try:
        message = decode_pubsub(event["type"], event["source"], event.data)
    except EventError as exc:
        # Acked (no exception): a malformed event never succeeds on redelivery.
        _log("ERROR", function, event_id=event["id"], error=str(exc))
        return
    _log(
        "INFO",
        function,
        event_id=event["id"],
        topic=message.topic,
        message_id=message.message_id,
        attributes=message.attributes,
        size=len(message.data),
    )


@functions_framework.cloud_event
def on_data_arrival(event: CloudEvent) -> None:
    _received("on_data_arrival", event)


@functions_framework.cloud_event
def on_drift(event: CloudEvent) -> None:
    _received("on_drift", event)


@functions_framework.cloud_event
def on_schedule(event: CloudEvent) -> None:
    _received("on_schedule", event)


@functions_framework.cloud_event
def gatekeeper(event: CloudEvent) -> None:
    _received("gatekeeper", event)
