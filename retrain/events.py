"""Decoding of the CloudEvents that Pub/Sub (and the GCS notifications it carries) deliver."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrain.config import Settings

__all__ = [
    "DEDUPE_ATTRIBUTE",
    "EventError",
    "ObjectEvent",
    "PubsubMessage",
    "check_data_uris",
    "decode_pubsub",
    "json_object",
    "object_event",
]

PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
FINALIZED = "google.cloud.storage.object.v1.finalized"
FINALIZE_KINDS = frozenset({"OBJECT_FINALIZE", FINALIZED})
MAX_PAYLOAD_BYTES = 1_000_000
# Set by `retrain republish`: the event keeps its original dedupe key, so a replay of an
# event that already ran starts nothing (unless the operator asked for --force).
DEDUPE_ATTRIBUTE = "retrain_dedupe_key"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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

    @property
    def dedupe_key(self) -> str:
        """The message id of the original publish (kept across a republish)."""
        return self.attributes.get(DEDUPE_ATTRIBUTE) or self.message_id


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


def json_object(message: PubsubMessage) -> dict[str, Any]:
    """The message's data as a JSON object, within the size limit."""
    if len(message.data) > MAX_PAYLOAD_BYTES:
        raise EventError(
            f"message {message.message_id}: {len(message.data)} bytes is over the "
            f"{MAX_PAYLOAD_BYTES} limit"
        )
    try:
        value = json.loads(message.data)
    except ValueError as exc:
        raise EventError(f"message {message.message_id}: data is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise EventError(f"message {message.message_id}: data is JSON but not an object")
    return value


@dataclass(frozen=True)
class ObjectEvent:
    """A GCS object event, from a Pub/Sub notification or a direct storage CloudEvent."""

    event_id: str
    kind: str
    bucket: str
    name: str
    generation: str
    override: str | None = None
    size: int | None = None  # bytes of this generation, where the notification says

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @property
    def dedupe_key(self) -> str:
        # data_objects.object_key: a republish keeps it (the override is this same key)
        return self.override or f"{self.bucket}/{self.name}#{self.generation}"

    @property
    def is_finalize(self) -> bool:
        return self.kind in FINALIZE_KINDS


def object_event(event_type: str, source: str, event_id: str, data: Any) -> ObjectEvent:
    """Decode an OBJECT_FINALIZE notification wrapped in ``messagePublished``, or a direct
    ``google.cloud.storage.object.v1.finalized`` event; refuse unsafe object names."""
    if event_type == PUBLISHED:
        message = decode_pubsub(event_type, source, data)
        attributes = message.attributes
        payload: dict[str, Any] = {}
        if message.data:
            payload = json_object(message)
        kind = attributes.get("eventType", "")
        bucket = attributes.get("bucketId") or payload.get("bucket")
        name = attributes.get("objectId") or payload.get("name")
        generation = attributes.get("objectGeneration") or payload.get("generation")
        event_id = message.message_id
        override = attributes.get(DEDUPE_ATTRIBUTE)
        size = payload.get("size")
    elif event_type == FINALIZED or event_type.startswith("google.cloud.storage.object.v1."):
        if not isinstance(data, dict):
            raise EventError(f"event {event_id}: storage event data is not an object")
        kind = event_type
        bucket, name, generation = data.get("bucket"), data.get("name"), data.get("generation")
        override, size = None, data.get("size")
    else:
        raise EventError(f"event {event_id}: type {event_type!r} is not a storage notification")
    for field_name, value in (("bucket", bucket), ("name", name), ("generation", generation)):
        if not isinstance(value, str | int) or value == "":
            raise EventError(f"event {event_id}: object {field_name} is missing")
    name = str(name)
    if ".." in name.split("/") or _CONTROL.search(name) or len(name.encode()) > 1024:
        raise EventError(f"event {event_id}: object name {name!r} is not a safe object name")
    return ObjectEvent(event_id, kind, str(bucket), name, str(generation), override,
                       _size(size))  # fmt: skip


def _size(value: Any) -> int | None:
    """The object's size as the notification gives it (JSON_API_V1: a decimal string); None
    if absent or not a size (it only spares a request: the store is asked instead)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return None


def check_data_uris(settings: Settings, model: str, uris: list[str], where: str) -> None:
    """Every URI a request names must be a ``gs://`` object under the model's own data
    prefix: a run reads only the model's data (never a local file, another bucket, or a
    path that climbs out with ``..``). :class:`EventError` names ``where`` (the field or
    option) and the URI."""
    spec = settings.models[model]
    prefix = f"gs://{settings.buckets.data}/{spec.data_prefix}"
    for uri in uris:
        segments = uri.removeprefix("gs://").split("/")
        if not uri.startswith(prefix) or ".." in segments or "." in segments or uri == prefix:
            raise EventError(
                f"{where}: {uri!r} is not an object under {prefix} (a run reads only its "
                "model's own data)"
            )
