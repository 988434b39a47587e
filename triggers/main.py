"""Cloud Function entry points (CloudEvent signature), one per topic. Thin on purpose.

Each function decodes its event and hands it to :class:`retrain.service.RetrainService`,
then logs one structured line. A malformed event is logged and acked: it can never
succeed. Any other error propagates, so Pub/Sub retries it and, after the subscription's
delivery attempts, dead-letters it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import functions_framework
from cloudevents.http.event import CloudEvent

from retrain import jsonlog
from retrain.config import load_settings
from retrain.events import EventError, decode_pubsub, object_event
from retrain.messages import MessageError, MetricsReport, decode
from retrain.service import Outcome, build_service

_CONFIG = Path(os.environ.get("RETRAIN_CONFIG", "retrain.yaml"))
_SERVICE = build_service(load_settings(_CONFIG), _CONFIG)


def _log(severity: str, function: str, **fields: Any) -> None:
    # Cloud Functions turns one JSON line on stdout into one structured log entry: each is
    # one write of the whole line (retrain.jsonlog), so concurrent requests' lines stay apart.
    jsonlog.write_line({"severity": severity, "function": function, **fields})


def _handle(function: str, event: CloudEvent, handler: Callable[[], Outcome]) -> None:
    started = time.perf_counter()
    try:
        outcome = handler()
    except EventError as exc:  # acked: redelivery would never succeed
        _log("ERROR", function, event_id=event["id"], error=str(exc))
        return
    took = round((time.perf_counter() - started) * 1000, 2)
    severity = "ERROR" if outcome.action == "quarantined" else "INFO"  # bad data: one line
    _log(severity, function, event_id=event["id"], at=time.time(), ms=took, **outcome.log_fields())


@functions_framework.cloud_event
def on_data_arrival(event: CloudEvent) -> None:
    _handle(
        "on_data_arrival",
        event,
        lambda: _SERVICE.data_arrival(
            object_event(event["type"], event["source"], event["id"], event.data)
        ),
    )


@functions_framework.cloud_event
def on_drift(event: CloudEvent) -> None:
    _handle(
        "on_drift",
        event,
        lambda: _SERVICE.drift_alert(decode_pubsub(event["type"], event["source"], event.data)),
    )


@functions_framework.cloud_event
def on_schedule(event: CloudEvent) -> None:
    _handle(
        "on_schedule",
        event,
        lambda: _SERVICE.schedule(decode_pubsub(event["type"], event["source"], event.data)),
    )


@functions_framework.cloud_event
def gatekeeper(event: CloudEvent) -> None:
    message = decode_pubsub(event["type"], event["source"], event.data)
    try:
        report = decode(MetricsReport, message.data)
    except MessageError as exc:
        # Not acked: after the delivery attempts it waits in the dead-letter topic, where an
        # operator can inspect it; the champion is untouched.
        _log("ERROR", "gatekeeper", event_id=event["id"], error=str(exc))
        raise
    _handle("gatekeeper", event, lambda: _SERVICE.report(report))


__all__ = ["gatekeeper", "on_data_arrival", "on_drift", "on_schedule"]
