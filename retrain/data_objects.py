"""Which data objects a run trains on: the model's current data window."""

from __future__ import annotations

from typing import Any

from retrain.config import Settings
from retrain.messages import RetrainRequest

__all__ = ["MAX_OBJECTS", "data_window"]

# A run reads at most this many of the newest objects under the model's prefix; the
# training window (rows by the order column) is then cut from them by preprocess.
MAX_OBJECTS = 200


def data_window(
    settings: Settings, model: str, requests: list[RetrainRequest], client: Any | None = None
) -> list[str]:
    """The newest objects under the model's data prefix, plus any URI a request names that
    lies elsewhere (a manual request may point at any data)."""
    if client is None:
        from google.cloud import storage  # noqa: PLC0415

        client = storage.Client()
    spec = settings.models[model]
    bucket = settings.buckets.data
    blobs = [
        blob
        for blob in client.list_blobs(bucket, prefix=spec.data_prefix)
        if not blob.name.endswith("/") and not blob.name.startswith("gcloud/tmp/")
    ]
    blobs.sort(key=lambda b: (b.updated, b.name))
    uris = [f"gs://{bucket}/{blob.name}" for blob in blobs[-MAX_OBJECTS:]]
    for request in requests:
        uris += [uri for uri in request.data_uris if uri not in uris]
    return uris
