"""Clients of a module's own stack (each e2e module starts the ``stack`` it needs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from google.cloud import pubsub_v1

from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.statedb import Database
from tests.conftest import unique


@pytest.fixture(scope="module")
def state(stack: Stack) -> Database:
    settings = stack.settings
    return Database(
        emulators.firestore_client(stack.firestore_host, settings.project, settings.database)
    )


@pytest.fixture(scope="module")
def storage(stack: Stack) -> Any:
    return emulators.storage_client(stack.gcs_url, stack.settings.project)


@pytest.fixture(scope="module")
def registry(stack: Stack, state: Database, storage: Any) -> FirestoreRegistry:
    return FirestoreRegistry(state, stack.settings.buckets.models, storage)


@pytest.fixture(scope="module")
def ledger(state: Database) -> FirestoreLedger:
    return FirestoreLedger(state)


def subscribed(
    stack: Stack, subscriber: pubsub_v1.SubscriberClient, topic: str, prefix: str
) -> Iterator[str]:
    """A subscription of its own to ``topic``, deleted afterwards (for a fixture to yield)."""
    project = stack.settings.project
    name = subscriber.subscription_path(project, unique(prefix))
    subscriber.create_subscription(name=name, topic=f"projects/{project}/topics/{topic}")
    yield name
    subscriber.delete_subscription(subscription=name)
