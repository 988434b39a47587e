"""The messaging topology that ``retrain.yaml`` implies, and how to create it.

The same description drives the local stack (created here through the real client
libraries) and, later, Terraform; so topics, subscriptions and dead-letter routes cannot
drift apart between the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from google.api_core.exceptions import AlreadyExists
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2

from retrain.config import FUNCTION_TOPICS, Delivery, Settings

__all__ = ["PushRoute", "Topology", "apply_pubsub", "topology"]

DEAD_LETTER_SUFFIX = "-dead-letter"


@dataclass(frozen=True)
class PushRoute:
    """A push subscription from ``topic`` to the Cloud Function ``function``."""

    topic: str
    function: str

    @property
    def subscription(self) -> str:
        return f"{self.topic}-{self.function.replace('_', '-')}"

    @property
    def dead_letter_topic(self) -> str:
        return self.topic + DEAD_LETTER_SUFFIX


@dataclass(frozen=True)
class Topology:
    topics: tuple[str, ...]
    pushes: tuple[PushRoute, ...]
    # Pull subscriptions by name -> topic: one on every dead-letter topic (to inspect and
    # replay), and one on model-decisions for whoever watches the outcomes.
    pulls: dict[str, str]
    delivery: Delivery

    @property
    def all_topics(self) -> tuple[str, ...]:
        return self.topics + tuple(t + DEAD_LETTER_SUFFIX for t in self.topics)


def topology(settings: Settings) -> Topology:
    names = settings.topics.names()
    pushes = tuple(PushRoute(names[field], function) for function, field in FUNCTION_TOPICS.items())
    pulls = {t + DEAD_LETTER_SUFFIX: t + DEAD_LETTER_SUFFIX for t in names.values()}
    decisions = settings.topics.model_decisions
    pulls[f"{decisions}-watch"] = decisions  # for operators and the demo
    pulls[f"{decisions}-serving"] = decisions  # the prediction server swaps on promotions
    return Topology(tuple(names.values()), pushes, pulls, settings.delivery)


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def push_subscription(
    project: str, route: PushRoute, endpoint: str, delivery: Delivery, *, retry_policy: bool = True
) -> pubsub_v1.types.Subscription:
    """The subscription resource for one push route, with dead-letter and retry policy (the
    retry policy can be left out: see :func:`apply_pubsub`)."""
    subscription = pubsub_v1.types.Subscription(
        name=f"projects/{project}/subscriptions/{route.subscription}",
        topic=f"projects/{project}/topics/{route.topic}",
        push_config=pubsub_v1.types.PushConfig(push_endpoint=endpoint),
        ack_deadline_seconds=delivery.ack_deadline_seconds,
        dead_letter_policy=pubsub_v1.types.DeadLetterPolicy(
            dead_letter_topic=f"projects/{project}/topics/{route.dead_letter_topic}",
            max_delivery_attempts=delivery.max_delivery_attempts,
        ),
    )
    if retry_policy:
        subscription.retry_policy = pubsub_v1.types.RetryPolicy(
            minimum_backoff=_seconds(delivery.min_backoff_seconds),
            maximum_backoff=_seconds(delivery.max_backoff_seconds),
        )
    return subscription


def apply_pubsub(
    project: str,
    plan: Topology,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    endpoint_for: Callable[[PushRoute], str],
) -> None:
    """Create every topic and subscription of ``plan`` in the Pub/Sub emulator (the local
    stack; Terraform makes the cloud's); what already exists is kept.

    The push subscriptions get no retry policy: the emulator (0.8.20) loses its retries
    when two failing messages of one subscription fall due in the same millisecond (a
    NullPointerException kills its retry task, silently), and from then on no message of
    that subscription is retried or dead-lettered. Without a retry policy it redelivers
    about every second, and dead-letters after ``max_delivery_attempts`` as documented."""
    for topic in plan.all_topics:
        with contextlib.suppress(AlreadyExists):
            publisher.create_topic(name=f"projects/{project}/topics/{topic}")
    for sub, topic in plan.pulls.items():
        with contextlib.suppress(AlreadyExists):
            subscriber.create_subscription(
                name=f"projects/{project}/subscriptions/{sub}",
                topic=f"projects/{project}/topics/{topic}",
                ack_deadline_seconds=plan.delivery.ack_deadline_seconds,
            )
    for route in plan.pushes:
        request = push_subscription(
            project, route, endpoint_for(route), plan.delivery, retry_policy=False
        )
        with contextlib.suppress(AlreadyExists):
            subscriber.create_subscription(request=request)
