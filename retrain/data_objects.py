"""Which data objects a run trains on: the model's current data window."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrain.config import Settings
from retrain.messages import RetrainRequest

if TYPE_CHECKING:
    from retrain.ledger import FirestoreLedger

__all__ = [
    "MAX_OBJECTS",
    "RunInputs",
    "data_window",
    "gather",
    "newest_objects",
    "object_key",
    "window_left",
]

# A run looks at most at this many of the newest objects under the model's prefix.
MAX_OBJECTS = 1000


def data_window(
    settings: Settings,
    model: str,
    requests: list[RetrainRequest],
    client: Any | None = None,
    ledger: FirestoreLedger | None = None,
) -> list[str]:
    """The objects a run reads, oldest first: the newest objects under the model's data
    prefix that were not quarantined, until they hold ``training_window.rows`` rows (as
    counted at arrival) within ``training_window.max_bytes``; plus any URI a request names
    that lies elsewhere (a manual request may point at any data). An object whose arrival
    was never recorded (its notification was lost) is read, its rows uncounted; preprocess
    checks it like any other."""
    if client is None:
        from google.cloud import storage  # noqa: PLC0415

        client = storage.Client()
    if ledger is None:
        from retrain import statedb  # noqa: PLC0415
        from retrain.ledger import FirestoreLedger  # noqa: PLC0415

        ledger = FirestoreLedger(statedb.database(settings))
    spec = settings.models[model]
    bucket = settings.buckets.data
    blobs = newest_objects(settings, model, client)
    keys = [object_key(bucket, blob.name, blob.generation) for blob in blobs]
    arrivals = ledger.arrivals(model, keys)
    wanted, window = spec.training_window.rows, spec.training_window.max_bytes
    chosen: list[str] = []
    rows = size = 0
    for blob, key in zip(blobs, keys, strict=True):
        arrival = arrivals.get(key, {})
        if arrival.get("outcome") == "quarantined":
            continue
        if chosen and size + (blob.size or 0) > window:
            break
        chosen.append(f"gs://{bucket}/{blob.name}")
        rows += int(arrival.get("rows") or 0)
        size += blob.size or 0
        if wanted is not None and rows >= wanted:
            break
    uris = chosen[::-1]
    for request in requests:
        uris += [uri for uri in request.data_uris if uri not in uris]
    return uris


def newest_objects(settings: Settings, model: str, client: Any) -> list[Any]:
    """The newest :data:`MAX_OBJECTS` data objects (blobs) of ``model``, newest first."""
    blobs = [
        blob
        for blob in client.list_blobs(
            settings.buckets.data, prefix=settings.models[model].data_prefix
        )
        if not blob.name.endswith("/") and not blob.name.startswith("gcloud/tmp/")
    ]
    blobs.sort(key=lambda b: (b.updated, b.name), reverse=True)
    return blobs[:MAX_OBJECTS]


def object_key(bucket: str, name: str, generation: object) -> str:
    """The dedupe key of an object's arrival: its notification's, whoever delivers it."""
    return f"{bucket}/{name}#{generation}"


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


def window_left(window: float, since: float | None, now: float) -> float:
    """What is left at ``now`` of a coalescing window of ``window`` seconds opened at
    ``since`` (all of it if unknown: None, or 0 from a run record older than its
    ``created_at``; never more, whatever the clocks say)."""
    if not since:
        return window
    return min(window, max(0.0, since + window - now))


def gather(
    settings: Settings,
    ledger: FirestoreLedger,
    model: str,
    run_id: str,
    *,
    since: float | None = None,
) -> RunInputs:
    """Wait out the coalescing window, take every pending event of ``model`` into run
    ``run_id`` (which holds the model's lease), and mark the run started on its window.

    The window (the model's ``coalesce_seconds``) is counted from ``since``, when the run
    took the lease (its record's ``created_at``), if given: a worker that took a second to
    start waits only the rest of it.

    Raises :class:`LookupError` if nothing is pending: another run covered the events.
    """
    window = settings.models[model].coalesce_seconds
    threading.Event().wait(window_left(window, since, ledger.clock()))
    requests = ledger.collect(model, run_id)
    if not requests:
        raise LookupError(f"no pending events for {model}; another run covered them")
    uris = data_window(settings, model, requests, ledger=ledger)
    ledger.start(model, run_id, uris)
    return RunInputs(uris, requests)
