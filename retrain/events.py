"""Decoding of the CloudEvents that Pub/Sub (and the GCS notifications it carries) deliver."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EventError", "PubsubMessage", "decode_pubsub"]

PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
_TOPIC_SOURCE = re.compile(r"projects/(?P<project>[^/]+)/topics/(?P<topic>[^/]+)$")


class EventError(ValueError):
    """An event that can never be handled, however often it is redelivered."""


@dataclass(frozen=True)
class PubsubMessage:
    message_id: str
    data: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    publish_time: str | None = None
    topic: str | None = None
    delivery_attempt: int | None = None


def decode_pubsub(event_type: str, source: str, data: Any) -> PubsubMessage:
    """The Pub/Sub message inside a ``messagePublished`` CloudEvent.

    ``source`` is the CloudEvent source, for example
    ``//pubsub.googleapis.com/projects/P/topics/T``; it names the topic.
    """
    if event_type != PUBLISHED:
        raise EventError(f"event type {event_type!r} is not {PUBLISHED}")
    if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
        raise EventError("event data has no 'message' object")
    message = data["message"]
    message_id = message.get("messageId") or message.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise EventError("message has no messageId")
    raw = message.get("data", "")
    if not isinstance(raw, str):
        raise EventError(f"message {message_id}: 'data' is not a base64 string")
    try:
        payload = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EventError(f"message {message_id}: 'data' is not valid base64") from exc
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise EventError(f"message {message_id}: 'attributes' is not a map of strings")
    match = _TOPIC_SOURCE.search(source or "")
    attempt = data.get("deliveryAttempt")
    return PubsubMessage(
        message_id=message_id,
        data=payload,
        attributes=attributes,
        publish_time=message.get("publishTime") or message.get("publish_time"),
        topic=match.group("topic") if match else None,
        delivery_attempt=attempt if isinstance(attempt, int) else None,
    )
