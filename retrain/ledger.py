"""The ``RunLedger``: one claim per event, one run per model at a time, nothing lost.

Backed by GCS objects created with ``if_generation_match=0`` (create only), which real GCS
and fake-gcs-server both enforce. Layout under ``gs://<artifacts>/ledger/<model>/``::

    events/<h>.json    the claim of one event (h = sha256 of its dedupe key), create-only
    arrivals/<h>.json  a data arrival that a drift policy checked, and what it decided
    pending/<h>.json   the event waits for a run; removed by the run that covers it
    lease.json         the model's single-flight lease: which run holds it, until when
    runs/<run id>.json the run: its events, data, state, and when it started and ended

An event is *done* once a run covered it: its claim then names the run, and a duplicate
does nothing. A duplicate that finds the marker still there only nudges the lease, so an
event whose first delivery died half-way is still covered, by exactly one run.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from retrain.messages import RetrainRequest

if TYPE_CHECKING:
    from google.cloud import storage

__all__ = [
    "Acquired",
    "Claim",
    "GcsLedger",
    "Lease",
    "RunLedger",
    "RunRecord",
    "event_hash",
    "new_run_id",
]

Claim = Literal["new", "pending", "done"]
RunState = Literal["gathering", "running", "succeeded", "failed", "abandoned"]


def new_run_id(model: str) -> str:
    return f"{model}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def event_hash(dedupe_key: str) -> str:
    return hashlib.sha256(dedupe_key.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Lease:
    run_id: str
    acquired_at: float
    expires_at: float
    generation: int


@dataclass(frozen=True)
class Acquired:
    """Whether the lease was taken, and which run holds it now (if known)."""

    acquired: bool
    holder: str | None


@dataclass
class RunRecord:
    model: str
    run_id: str
    state: RunState
    reason: str = ""
    request_id: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    data_uris: list[str] = field(default_factory=list)
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    launched_as: str | None = None  # the pipeline job (Vertex AI) or run (KFP) it submitted
    finished_at: float | None = None  # when it reported (or gave up), even after a takeover

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2).encode()


class RunLedger(Protocol):
    def claim(self, request: RetrainRequest) -> Claim: ...
    def try_acquire(self, model: str, run_id: str, ttl: float) -> Acquired: ...
    def collect(self, model: str, run_id: str) -> list[RetrainRequest]: ...
    def finish(
        self, model: str, run_id: str, state: RunState, error: str | None = None
    ) -> bool: ...
    def abandon(self, model: str, run_id: str, error: str) -> bool: ...
    def has_pending(self, model: str) -> bool: ...


class GcsLedger:
    """The ledger in ``gs://bucket/ledger/``; the storage client is made on first use."""

    def __init__(
        self,
        bucket: str,
        client: storage.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket_name = bucket
        self._client = client
        self.clock = clock

    # -- plumbing ------------------------------------------------------------------

    @property
    def bucket(self) -> storage.Bucket:
        if self._client is None:
            from google.cloud import storage  # noqa: PLC0415 (kept off the import path)

            self._client = storage.Client()
        return self._client.bucket(self.bucket_name)

    @staticmethod
    def _path(model: str, *parts: str) -> str:
        return "/".join(["ledger", model, *parts])

    def _create(self, name: str, body: bytes) -> bool:
        """Create ``name`` only if it does not exist; False if it did."""
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        try:
            self.bucket.blob(name).upload_from_string(
                body, content_type="application/json", if_generation_match=0
            )
        except PreconditionFailed:
            return False
        return True

    def _read(self, name: str) -> tuple[dict[str, Any], int] | None:
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        blob = self.bucket.blob(name)
        try:
            body = blob.download_as_bytes()
        except NotFound:
            return None
        value: dict[str, Any] = json.loads(body)
        return value, int(blob.generation)

    def _exists(self, name: str) -> bool:
        return bool(self.bucket.blob(name).exists())

    def _delete(self, name: str, generation: int | None = None) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed  # noqa: PLC0415

        try:
            self.bucket.blob(name).delete(if_generation_match=generation)
        except (NotFound, PreconditionFailed):
            return False
        return True

    # -- events --------------------------------------------------------------------

    def claim(self, request: RetrainRequest) -> Claim:
        """Record ``request`` once. ``new``: first sight; ``pending``: seen, not yet covered
        by a run; ``done``: a run covered it (or is covering it).

        Two create-only writes on the first sight, one for a duplicate that is still pending;
        this is the hot path of every function.
        """
        h = event_hash(request.dedupe_key)
        pending = self._path(request.model, "pending", f"{h}.json")
        claim = self._path(request.model, "events", f"{h}.json")
        body = json.dumps(
            {"request": json.loads(request.model_dump_json()), "received_at": self.clock()}
        ).encode()
        # The marker first: a delivery that dies after it is redelivered, finds the marker,
        # and only nudges the lease; the run that covers the event writes any missing claim.
        if not self._create(pending, body):
            return "pending"
        if self._create(claim, body):
            return "new"
        # Claimed long ago, and its marker was consumed: a late duplicate. Undo our marker,
        # unless a run has not yet covered the claim (then the marker is rightly there).
        found = self._read(claim)
        if found is not None and found[0].get("run_id"):
            self._delete(pending)
            return "done"
        return "pending"

    def record_arrival(self, request: RetrainRequest) -> bool:
        """For arrival policies that look at the data first: True the first time only."""
        body = json.dumps(
            {
                "request": json.loads(request.model_dump_json()),
                "received_at": self.clock(),
                "outcome": None,
            }
        ).encode()
        return self._create(self._arrival(request), body)

    def settle_arrival(self, request: RetrainRequest, outcome: str, **fields: Any) -> None:
        """What the check of an arrival decided (``no_drift``, ``drift``, ``first_model``...)."""
        self._update(self._arrival(request), outcome=outcome, settled_at=self.clock(), **fields)

    def arrival(self, model: str, dedupe_key: str) -> dict[str, Any] | None:
        found = self._read(self._path(model, "arrivals", f"{event_hash(dedupe_key)}.json"))
        return found[0] if found else None

    def _arrival(self, request: RetrainRequest) -> str:
        return self._path(request.model, "arrivals", f"{event_hash(request.dedupe_key)}.json")

    def _update(self, name: str, **fields: Any) -> None:
        found = self._read(name)
        if found is None:
            raise KeyError(f"gs://{self.bucket_name}/{name} does not exist")
        value, generation = found
        value.update(fields)
        self.bucket.blob(name).upload_from_string(
            json.dumps(value).encode(),
            content_type="application/json",
            if_generation_match=generation,
        )

    def event(self, model: str, dedupe_key: str) -> dict[str, Any] | None:
        found = self._read(self._path(model, "events", f"{event_hash(dedupe_key)}.json"))
        return found[0] if found else None

    def has_pending(self, model: str) -> bool:
        blobs = self.bucket.client.list_blobs(
            self.bucket_name, prefix=self._path(model, "pending") + "/", max_results=1
        )
        return any(True for _ in blobs)

    def pending(self, model: str) -> Iterator[tuple[str, RetrainRequest]]:
        prefix = self._path(model, "pending") + "/"
        for blob in self.bucket.client.list_blobs(self.bucket_name, prefix=prefix):
            body = json.loads(blob.download_as_bytes())
            yield blob.name, RetrainRequest.model_validate(body["request"])

    # -- the lease -----------------------------------------------------------------

    def lease(self, model: str) -> Lease | None:
        found = self._read(self._path(model, "lease.json"))
        if found is None:
            return None
        value, generation = found
        return Lease(value["run_id"], value["acquired_at"], value["expires_at"], generation)

    def try_acquire(self, model: str, run_id: str, ttl: float) -> Acquired:
        """Take the model's lease for ``run_id``; also from a holder whose lease expired."""
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        now = self.clock()
        body = json.dumps({"run_id": run_id, "acquired_at": now, "expires_at": now + ttl}).encode()
        name = self._path(model, "lease.json")
        current = self.lease(model)  # a read first: most callers find the lease held
        if current is None:
            for _ in range(2):  # once more if the lease was released between create and read
                if self._create(name, body):
                    self._write_run(RunRecord(model, run_id, "gathering", created_at=now))
                    return Acquired(True, run_id)
                current = self.lease(model)
                if current is not None:
                    break
        if current is None or current.expires_at > now:
            return Acquired(False, current.run_id if current else None)
        try:  # the holder died without a report: take over, at this generation only
            self.bucket.blob(name).upload_from_string(
                body, content_type="application/json", if_generation_match=current.generation
            )
        except PreconditionFailed:
            return Acquired(False, None)
        self._end_run(model, current.run_id, "abandoned", f"lease expired at {current.expires_at}")
        self._requeue(model, current.run_id)
        self._write_run(RunRecord(model, run_id, "gathering", created_at=now))
        return Acquired(True, run_id)

    def _requeue(self, model: str, run_id: str) -> None:
        """The events of a run that died without a report wait again, for the next run."""
        record = self.run(model, run_id)
        for event in record.events if record else []:
            request = RetrainRequest(
                model=model,
                reason=event["reason"],
                data_uris=event["data_uris"],
                dedupe_key=event["dedupe_key"],
                trigger_event_id=event["trigger_event_id"],
                time=event["time"],
            )
            body = json.dumps({"request": json.loads(request.model_dump_json())}).encode()
            self._create(
                self._path(model, "pending", f"{event_hash(request.dedupe_key)}.json"), body
            )

    def renew(self, model: str, run_id: str, ttl: float) -> bool:
        """Extend ``run_id``'s lease by ``ttl`` from now; False if it no longer holds it."""
        return self._pass_lease(model, run_id, run_id, ttl, keep_start=True)

    def _pass_lease(
        self, model: str, holder: str, to_run: str, ttl: float, *, keep_start: bool
    ) -> bool:
        """Rewrite the lease that ``holder`` holds, for ``to_run``, until now + ``ttl``; False
        if ``holder`` no longer holds it (released, taken over, or written meanwhile)."""
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        current = self.lease(model)
        if current is None or current.run_id != holder:
            return False
        now = self.clock()
        start = current.acquired_at if keep_start else now
        body = {"run_id": to_run, "acquired_at": start, "expires_at": now + ttl}
        try:
            self.bucket.blob(self._path(model, "lease.json")).upload_from_string(
                json.dumps(body).encode(),
                content_type="application/json",
                if_generation_match=current.generation,
            )
        except PreconditionFailed:
            return False
        return True

    def collect(self, model: str, run_id: str) -> list[RetrainRequest]:
        """Move every pending event into run ``run_id``; the run then covers them.

        Each event's claim is marked with the run first (created if a crashed delivery never
        wrote it), so a late duplicate of a covered event is recognised and never run twice.
        """
        record = self.run(model, run_id) or RunRecord(
            model, run_id, "gathering", created_at=self.clock()
        )
        requests = []
        for name, request in sorted(self.pending(model), key=lambda p: p[1].time):
            if not self._cover(model, request, run_id):
                self._delete(name)  # a stale marker of an event another run covered
                continue
            requests.append(request)
            record.events.append(
                {
                    "dedupe_key": request.dedupe_key,
                    "trigger_event_id": request.trigger_event_id,
                    "reason": request.reason,
                    "data_uris": request.data_uris,
                    "time": request.time.isoformat(),
                }
            )
            self._write_run(record)  # recorded in the run before the marker goes
            self._delete(name)
        if requests and not record.request_id:
            record.request_id = requests[0].dedupe_key
            record.reason = requests[0].reason
        self._write_run(record)
        return requests

    def _cover(self, model: str, request: RetrainRequest, run_id: str) -> bool:
        """Mark the event's claim as covered by ``run_id``; False if another run has it."""
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        name = self._path(model, "events", f"{event_hash(request.dedupe_key)}.json")
        for _ in range(5):
            found = self._read(name)
            value = found[0] if found else {"request": json.loads(request.model_dump_json())}
            other = value.get("run_id")
            if other not in (None, run_id):
                earlier = self.run(model, str(other))
                if earlier is not None and earlier.state != "abandoned":
                    return False  # covered by a run that ran: a stale duplicate marker
            value["run_id"] = run_id
            try:
                self.bucket.blob(name).upload_from_string(
                    json.dumps(value).encode(),
                    content_type="application/json",
                    if_generation_match=found[1] if found else 0,
                )
            except PreconditionFailed:
                continue  # written in between: read it again
            return True
        raise RuntimeError(f"gs://{self.bucket_name}/{name} keeps changing; cannot cover it")

    def start(self, model: str, run_id: str, data_uris: list[str]) -> None:
        record = self.run(model, run_id) or RunRecord(model, run_id, "gathering")
        record.state, record.started_at, record.data_uris = "running", self.clock(), data_uris
        self._write_run(record)

    def finish(self, model: str, run_id: str, state: RunState, error: str | None = None) -> bool:
        """End ``run_id`` and release the lease if it still holds it; True if it did. The
        run is marked finished even if it was taken over, so no hand-over revives it."""
        self._end_run(model, run_id, state, error)
        record = self.run(model, run_id)
        if record is not None and record.finished_at is None:
            record.finished_at = self.clock()
            self._write_run(record)
        current = self.lease(model)
        if current is None or current.run_id != run_id:
            return False
        return self._delete(self._path(model, "lease.json"), current.generation)

    def launched(self, model: str, run_id: str, job: str) -> None:
        """Record which pipeline job ``run_id`` submitted (the cloud launchers)."""
        record = self.run(model, run_id) or RunRecord(model, run_id, "running")
        record.launched_as = job
        self._write_run(record)

    def hand_over(self, model: str, run_id: str, to_run: str, ttl: float, why: str) -> bool:
        """``run_id`` found its events already running as run ``to_run``'s pipeline (whose
        lease had expired): give the lease to ``to_run`` for ``ttl``, so that its report
        releases it and no other run starts meanwhile; ``run_id`` ends as abandoned."""
        self._end_run(model, run_id, "abandoned", why)

        def finished() -> bool:
            record = self.run(model, to_run)
            return record is not None and record.finished_at is not None

        if finished():  # it reported already (its job ends a little after): no hand-over
            self.finish(model, run_id, "abandoned", why)
            return False
        if not self._pass_lease(model, run_id, to_run, ttl, keep_start=False):
            return False
        if finished():  # it reported while the lease was passed to it: release it
            self.finish(model, to_run, "abandoned", why)
            return False
        return True

    def abandon(self, model: str, run_id: str, error: str) -> bool:
        """``run_id`` will never run (its launch failed after it gathered its events): end
        it as abandoned, put its events back in the queue for the next run, and release
        the lease if it holds it; True if it did. Nothing it covered is lost."""
        self._end_run(model, run_id, "abandoned", error)
        self._requeue(model, run_id)
        current = self.lease(model)
        if current is None or current.run_id != run_id:
            return False
        return self._delete(self._path(model, "lease.json"), current.generation)

    # -- runs ----------------------------------------------------------------------

    def _write_run(self, record: RunRecord) -> None:
        self.bucket.blob(
            self._path(record.model, "runs", f"{record.run_id}.json")
        ).upload_from_string(record.to_json(), content_type="application/json")

    def _end_run(self, model: str, run_id: str, state: RunState, error: str | None) -> None:
        record = self.run(model, run_id)
        if record is None or record.ended_at is not None:
            return
        record.state, record.ended_at, record.error = state, self.clock(), error
        self._write_run(record)

    def run(self, model: str, run_id: str) -> RunRecord | None:
        found = self._read(self._path(model, "runs", f"{run_id}.json"))
        return RunRecord(**found[0]) if found else None

    def runs(self, model: str) -> list[RunRecord]:
        prefix = self._path(model, "runs") + "/"
        records = [
            RunRecord(**json.loads(blob.download_as_bytes()))
            for blob in self.bucket.client.list_blobs(self.bucket_name, prefix=prefix)
        ]
        return sorted(records, key=lambda r: r.created_at)
