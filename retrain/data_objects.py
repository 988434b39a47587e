"""Which data objects a run trains on: the model's current data window."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrain.config import Settings
from retrain.messages import RetrainRequest

if TYPE_CHECKING:
    from retrain.ledger import FirestoreLedger

__all__ = ["MAX_OBJECTS", "RunInputs", "data_window", "gather"]

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


@dataclass(frozen=True)
class RunInputs:
    """What a run trains on, and the events it covers (the first one names the request)."""

    data_uris: list[str]
    requests: list[RetrainRequest]

    @property
    def request_id(self) -> str:
        return self.requests[0].dedupe_key

    @property
    def reason(self) -> str:
        return self.requests[0].reason


def gather(
    settings: Settings,
    ledger: FirestoreLedger,
    model: str,
    run_id: str,
    *,
    wait: float | None = None,
) -> RunInputs:
    """Wait out the coalescing window, take every pending event of ``model`` into run
    ``run_id`` (which holds the model's lease), and mark the run started on its window.

    Raises :class:`LookupError` if nothing is pending: another run covered the events.
    """
    threading.Event().wait(settings.models[model].coalesce_seconds if wait is None else wait)
    requests = ledger.collect(model, run_id)
    if not requests:
        raise LookupError(f"no pending events for {model}; another run covered them")
    uris = data_window(settings, model, requests)
    ledger.start(model, run_id, uris)
    return RunInputs(uris, requests)
