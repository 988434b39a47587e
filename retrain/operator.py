"""What an operator does by hand: publish a well-formed event, replay dead-lettered or
recorded events, and list runs. Used by ``retrain publish``, ``republish`` and ``runs``.

The Pub/Sub and storage clients find the emulators (or Google Cloud) by their usual
environment variables.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from retrain import blobstore
from retrain.config import Settings
from retrain.events import DEDUPE_ATTRIBUTE, check_data_uris
from retrain.messages import DriftAlert, ScheduleMessage, encode

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

    from retrain.ledger import FirestoreLedger

__all__ = [
    "Published",
    "data_notification",
    "publish",
    "republish_dead_letters",
    "republish_event",
]

Kind = Literal["data", "drift", "schedule", "manual"]


@dataclass(frozen=True)
class Published:
    topic: str
    message_id: str
    dedupe_key: str | None


def data_notification(uri: str, client: Any | None = None) -> tuple[bytes, dict[str, str]]:
    """The OBJECT_FINALIZE notification GCS sends for ``uri``, for its current generation."""
    from google.cloud import storage  # noqa: PLC0415

    bucket, name = blobstore.split_uri(uri)
    blob = (client or storage.Client()).bucket(bucket).get_blob(name)
    if blob is None:
        raise FileNotFoundError(f"{uri} does not exist")
    resource = {"bucket": bucket, "name": name, "generation": str(blob.generation)}
    attributes = {
        "eventType": "OBJECT_FINALIZE",
        "bucketId": bucket,
        "objectId": name,
        "objectGeneration": str(blob.generation),
        "payloadFormat": "JSON_API_V1",
    }
    return json.dumps(resource).encode(), attributes


def _message(
    settings: Settings, kind: Kind, model: str, data_uris: list[str], key: str | None,
    summary: str,
) -> tuple[str, bytes, dict[str, str]]:  # fmt: skip
    topics = settings.topics
    if kind == "data":
        if len(data_uris) != 1:
            raise ValueError("publish data takes exactly one --data gs:// URI (the object)")
        body, attributes = data_notification(data_uris[0])
        return topics.data_arrivals, body, attributes
    if kind == "drift":
        alert = DriftAlert(model=model, kind="drift", data_uris=data_uris, summary=summary)
        return topics.drift_alerts, encode(alert), {"model": model}
    tick = ScheduleMessage(
        model=model,
        reason=kind,
        data_uris=data_uris,
        dedupe_key=(key or f"manual-{uuid.uuid4().hex}") if kind == "manual" else key,
    )
    return topics.retrain_schedule, encode(tick), {"model": model}


def publish(
    settings: Settings,
    publisher: pubsub_v1.PublisherClient,
    kind: Kind,
    model: str,
    data_uris: list[str] | None = None,
    key: str | None = None,
    summary: str = "published by an operator",
) -> Published:
    """Publish a well-formed ``kind`` event for ``model`` to its topic."""
    if model not in settings.models:
        raise ValueError(f"no model {model!r} in retrain.yaml ({', '.join(settings.models)})")
    check_data_uris(settings, model, data_uris or [], "--data")
    topic, body, attributes = _message(settings, kind, model, data_uris or [], key, summary)
    if key is not None and kind != "manual":
        attributes[DEDUPE_ATTRIBUTE] = key
    path = publisher.topic_path(settings.project, topic)
    message_id = publisher.publish(path, body, **attributes).result(timeout=60)
    return Published(topic, message_id, key)


def republish_dead_letters(
    settings: Settings,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    topic: str,
    limit: int,
    force: bool = False,
) -> Iterator[Published]:
    """Move up to ``limit`` messages from ``<topic>-dead-letter`` back to ``topic``.

    Each is acked only after its publish succeeded. It keeps its original dedupe key
    (its first message id), so an event that did run is not run again, unless ``force``.
    """
    from retrain.topology import DEAD_LETTER_SUFFIX  # noqa: PLC0415

    if topic not in settings.topics.names().values():
        raise ValueError(f"{topic!r} is not one of retrain.yaml's topics")
    subscription = subscriber.subscription_path(settings.project, topic + DEAD_LETTER_SUFFIX)
    target = publisher.topic_path(settings.project, topic)
    moved = 0
    while moved < limit:
        response = subscriber.pull(
            subscription=subscription, max_messages=min(100, limit - moved), timeout=10
        )
        if not response.received_messages:
            return
        for received in response.received_messages:
            message = received.message
            attributes = dict(message.attributes)
            original = attributes.get(DEDUPE_ATTRIBUTE) or _original_key(topic, settings, message)
            attributes[DEDUPE_ATTRIBUTE] = (
                f"{original}#force-{uuid.uuid4().hex[:8]}" if force else original
            )
            message_id = publisher.publish(target, message.data, **attributes).result(timeout=60)
            subscriber.acknowledge(subscription=subscription, ack_ids=[received.ack_id])
            moved += 1
            yield Published(topic, message_id, attributes[DEDUPE_ATTRIBUTE])


def _original_key(topic: str, settings: Settings, message: Any) -> str:
    """The dedupe key the message had at its first publish (DESIGN.md, "Dedupe keys")."""
    attributes = message.attributes
    if topic == settings.topics.data_arrivals and "objectId" in attributes:
        return f"{attributes['bucketId']}/{attributes['objectId']}#{attributes['objectGeneration']}"
    return str(message.message_id)


def republish_event(
    settings: Settings,
    publisher: pubsub_v1.PublisherClient,
    ledger: FirestoreLedger,
    model: str,
    dedupe_key: str,
    force: bool = False,
) -> Published:
    """Send a recorded event (by its dedupe key) again; with ``force``, under a new key."""
    recorded = ledger.event(model, dedupe_key) or ledger.arrival(model, dedupe_key)
    if recorded is None:
        raise LookupError(f"no recorded event {dedupe_key!r} for model {model!r}")
    request = recorded["request"]
    key = f"{dedupe_key}#force-{uuid.uuid4().hex[:8]}" if force else dedupe_key
    kind: Kind = request["reason"]
    return publish(settings, publisher, kind, model, request["data_uris"], key=key)
