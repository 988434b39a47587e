"""Functions served by functions-framework in tests: they record every delivery to a file.

``record`` accepts the event; ``fail`` records it and then raises, so the push fails and
Pub/Sub retries, then dead-letters it.
"""

from __future__ import annotations

import json
import os

import functions_framework
from cloudevents.http.event import CloudEvent


def _append(event: CloudEvent) -> None:
    line = json.dumps(
        {
            "id": event["id"],
            "type": event["type"],
            "source": event["source"],
            "data": event.data,
        }
    )
    with open(os.environ["RECORDER_FILE"], "a", encoding="utf-8") as out:
        out.write(line + "\n")


@functions_framework.cloud_event
def record(event: CloudEvent) -> None:
    _append(event)


@functions_framework.cloud_event
def fail(event: CloudEvent) -> None:
    _append(event)
    raise RuntimeError("this function always fails, so that Pub/Sub dead-letters the message")
