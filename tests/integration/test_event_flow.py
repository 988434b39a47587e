"""The cloud event flow on the real emulators: GCS -> Pub/Sub -> functions-framework."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from google.cloud import pubsub_v1

from retrain.localstack import Stack
from retrain.localstack.processes import wait_until
from retrain.topology import PushRoute, push_subscription
from tests.conftest import Recorder, unique

pytestmark = pytest.mark.integration

UNROUTED = "unrouted/"  # the data prefix of no model


def _deliveries_for(recorder: Recorder, object_name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in recorder.events()
        if e["data"]["message"].get("attributes", {}).get("objectId") == object_name
    ]


def test_upload_becomes_cloudevent_at_function_through_push_subscription(
    stack: Stack,
    gcs: Any,
    subscriber: pubsub_v1.SubscriberClient,
    recorder: Callable[[str], Recorder],
) -> None:
    """A file uploaded with google-cloud-storage arrives at a function as a CloudEvent."""
    project, arrivals = stack.settings.project, stack.settings.topics.data_arrivals
    function = recorder("record")
    sub = subscriber.subscription_path(project, unique("s"))
    subscriber.create_subscription(
        name=sub,
        topic=f"projects/{project}/topics/{arrivals}",
        push_config=pubsub_v1.types.PushConfig(
            push_endpoint=f"{function.url}/projects/{project}/topics/{arrivals}"
        ),
    )
    try:
        # Under no model's prefix: the stack's function only logs it as ignored, whatever
        # state the stack's models are in (no run, no drift check against a champion).
        name = f"{UNROUTED}{unique('upload')}.csv"
        blob = gcs.bucket(stack.settings.buckets.data).blob(name)
        blob.upload_from_string("day,rain\n1,0\n", content_type="text/csv")

        assert wait_until(lambda: bool(_deliveries_for(function, name)), timeout=30), (
            f"no CloudEvent for {name} reached the function"
        )
    finally:
        subscriber.delete_subscription(subscription=sub)
    (event,) = _deliveries_for(function, name)
    assert event["type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    assert event["source"].endswith(f"projects/{project}/topics/{arrivals}")
    attributes = event["data"]["message"]["attributes"]
    assert attributes["eventType"] == "OBJECT_FINALIZE"
    assert attributes["bucketId"] == stack.settings.buckets.data
    assert attributes["objectGeneration"] == str(blob.generation)
    payload = json.loads(base64.b64decode(event["data"]["message"]["data"]))
    assert payload["name"] == name
    assert payload["bucket"] == stack.settings.buckets.data

    # The stack's own on_data_arrival function got the same notification.
    log = stack.logs / "on_data_arrival.log"

    def handled() -> list[dict[str, Any]]:
        lines = log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if name in line and line.startswith("{")]

    assert wait_until(lambda: bool(handled()), timeout=15), log
    assert handled()[0]["action"] == "ignored"
    assert "belongs to no model's data prefix" in handled()[0]["detail"]


def test_objects_outside_the_data_bucket_fire_no_notification(
    stack: Stack,
    bucket: Any,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
) -> None:
    """As on GCS, only the data bucket notifies: run artifacts and reports, and the models
    the gatekeeper copies into the registry bucket, stay quiet."""
    project = stack.settings.project
    buckets = stack.settings.buckets
    sub = subscriber.subscription_path(project, unique("s"))
    subscriber.create_subscription(
        name=sub, topic=f"projects/{project}/topics/{stack.settings.topics.data_arrivals}"
    )
    quiet = [bucket.blob(f"{UNROUTED}{unique('elsewhere')}.csv")] + [
        bucket.client.bucket(name).blob(f"{UNROUTED}{unique('elsewhere')}.csv")
        for name in (buckets.artifacts, buckets.models)
    ]
    marker = bucket.client.bucket(buckets.data).blob(f"{UNROUTED}{unique('marker')}.csv")
    try:
        for blob in quiet:
            blob.upload_from_string("x")
        marker.upload_from_string("day,rain\n1,0\n")
        seen: list[str] = []

        def pulled_marker() -> bool:
            response = subscriber.pull(subscription=sub, max_messages=10, timeout=5)
            seen.extend(m.message.attributes["objectId"] for m in response.received_messages)
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=sub, ack_ids=[m.ack_id for m in response.received_messages]
                )
            return marker.name in seen

        assert wait_until(pulled_marker, timeout=30)
        assert not {blob.name for blob in quiet} & set(seen)
    finally:
        subscriber.delete_subscription(subscription=sub)
        for blob in [*quiet[1:], marker]:  # (the uuid bucket goes with its fixture)
            blob.delete()


def test_failing_function_dead_letters_message_after_five_attempts(
    stack: Stack,
    topic: str,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
    recorder: Callable[[str], Recorder],
) -> None:
    project = stack.settings.project
    function = recorder("fail")
    route = PushRoute(topic, "fail")
    publisher.create_topic(name=publisher.topic_path(project, route.dead_letter_topic))
    dead = subscriber.subscription_path(project, unique("dead"))
    subscriber.create_subscription(
        name=dead, topic=publisher.topic_path(project, route.dead_letter_topic)
    )
    # Short backoffs keep the test quick; the policy is otherwise the product's.
    delivery = stack.settings.delivery.model_copy(
        update={"min_backoff_seconds": 0.1, "max_backoff_seconds": 0.5}
    )
    push = push_subscription(
        project, route, f"{function.url}/projects/{project}/topics/{topic}", delivery
    )
    subscriber.create_subscription(request=push)
    try:
        message_id = publisher.publish(
            publisher.topic_path(project, topic), b'{"poison": true}', kind="test"
        ).result(timeout=30)

        received: list[Any] = []

        def dead_lettered() -> bool:
            response = subscriber.pull(subscription=dead, max_messages=1, timeout=5)
            received.extend(response.received_messages)
            return bool(received)

        assert wait_until(dead_lettered, timeout=90, interval=0.5), (
            f"message {message_id} never reached {route.dead_letter_topic}; "
            f"{len(function.events())} deliveries seen"
        )
    finally:
        subscriber.delete_subscription(subscription=push.name)
        subscriber.delete_subscription(subscription=dead)
        publisher.delete_topic(topic=publisher.topic_path(project, route.dead_letter_topic))
    (message,) = received
    assert message.message.data == b'{"poison": true}'
    assert message.message.attributes["kind"] == "test"
    attempts = [e for e in function.events() if e["data"]["message"]["messageId"] == message_id]
    assert len(attempts) == stack.settings.delivery.max_delivery_attempts == 5


def test_delivery_policy_is_on_every_push_subscription(
    stack: Stack, subscriber: pubsub_v1.SubscriberClient
) -> None:
    project = stack.settings.project
    for topic_field, function in (
        ("data_arrivals", "on_data_arrival"),
        ("model_metrics", "gatekeeper"),
    ):
        route = PushRoute(getattr(stack.settings.topics, topic_field), function)
        sub = subscriber.get_subscription(
            subscription=subscriber.subscription_path(project, route.subscription)
        )
        assert sub.push_config.push_endpoint == stack.push_endpoint(route)
        assert sub.dead_letter_policy.max_delivery_attempts == 5
        assert sub.dead_letter_policy.dead_letter_topic.endswith(
            f"/topics/{route.topic}-dead-letter"
        )
        # No retry policy in the emulator (it loses retries under one: apply_pubsub says
        # why); Terraform's subscriptions carry it (tests/unit/test_terraform.py).
        assert "retry_policy" not in sub


def test_a_batch_of_invalid_reports_all_reach_the_dead_letter_topic(
    stack: Stack,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
) -> None:
    """Issue 12 finding 9: with a retry policy the emulator redelivered a batch of invalid
    MetricsReports three times, then never again, and never dead-lettered them."""
    project, topics = stack.settings.project, stack.settings.topics
    dead = subscriber.subscription_path(project, unique("metrics-dead"))
    subscriber.create_subscription(
        name=dead, topic=publisher.topic_path(project, f"{topics.model_metrics}-dead-letter")
    )
    test_id = unique("invalid")
    topic = publisher.topic_path(project, topics.model_metrics)
    received: dict[str, Any] = {}

    def dead_lettered(wanted: int) -> Callable[[], bool]:
        def check() -> bool:
            response = subscriber.pull(subscription=dead, max_messages=10, timeout=5)
            for got in response.received_messages:
                subscriber.acknowledge(subscription=dead, ack_ids=[got.ack_id])
                if got.message.attributes.get("test_id") == test_id:
                    received[got.message.message_id] = got.message
            return len(received) >= wanted

        return check

    try:
        batch = [publisher.publish(topic, b'{"model": 1}', test_id=test_id) for _ in range(5)]
        for future in batch:
            future.result(timeout=30)
        assert wait_until(dead_lettered(5), timeout=120, interval=0.2), (
            f"{len(received)} of 5 invalid reports reached the dead-letter topic"
        )
        publisher.publish(topic, b'{"model": 2}', test_id=test_id).result(timeout=30)
        assert wait_until(dead_lettered(6), timeout=60, interval=0.2), "the next one did not"
    finally:
        subscriber.delete_subscription(subscription=dead)
    for message in received.values():
        assert message.attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
