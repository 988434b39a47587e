"""The floor of the trigger benchmark: a Cloud Function that does nothing with its event.

Served by functions-framework like ours and fed the same GCS notifications through the same
Pub/Sub push path (a second push subscription on the data-arrivals topic), it logs one line
per delivery as ours does (``object``, ``at``, ``ms``): upload -> handled for a function
with no work, so that what ours takes beyond it is our handler's work.
"""

from __future__ import annotations

import time

import functions_framework
from cloudevents.http.event import CloudEvent

from retrain import jsonlog


@functions_framework.cloud_event
def noop(event: CloudEvent) -> None:
    started = time.perf_counter()
    attributes = event.data["message"].get("attributes") or {}
    uri = f"gs://{attributes.get('bucketId')}/{attributes.get('objectId')}"
    took = round((time.perf_counter() - started) * 1000, 2)
    jsonlog.write_line({"severity": "INFO", "function": "noop", "event_id": event["id"],
                        "at": time.time(), "ms": took, "object": uri})  # fmt: skip
