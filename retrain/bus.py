"""The ``Bus`` port: publish our messages to Pub/Sub topics.

The Pub/Sub client chooses the emulator by ``PUBSUB_EMULATOR_HOST`` on its own; nothing
here knows whether it runs locally or in the cloud.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from retrain.messages import Message, encode

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

__all__ = ["Bus", "PubsubBus"]

PUBLISH_TIMEOUT_SECONDS = 60.0


class Bus(Protocol):
    def publish(self, topic: str, message: Message, **attributes: str) -> str:
        """Publish ``message`` to ``topic``; return the message id once it is accepted."""
        ...


class PubsubBus:
    """google-cloud-pubsub; the publisher client is made on first use."""

    def __init__(self, project: str, client: pubsub_v1.PublisherClient | None = None) -> None:
        self.project = project
        self._client = client

    @property
    def client(self) -> pubsub_v1.PublisherClient:
        if self._client is None:
            from google.cloud import pubsub_v1  # noqa: PLC0415 (kept off the import path)

            self._client = pubsub_v1.PublisherClient()
        return self._client

    def publish(self, topic: str, message: Message, **attributes: str) -> str:
        path = self.client.topic_path(self.project, topic)
        attributes = {"schema_version": str(message.schema_version), **attributes}
        future = self.client.publish(path, encode(message), **attributes)
        message_id: str = future.result(timeout=PUBLISH_TIMEOUT_SECONDS)
        return message_id
