"""The ``RunLedger``: one claim per event, one run per model at a time, nothing lost.

Kept in Firestore (:mod:`retrain.statedb`): every transition below is **one atomic
commit**, guarded by preconditions on what it read, so a caller that dies between two
transitions leaves a consistent ledger that any later call carries on from. Documents::

    ledger/<model>                  lease: which run holds the model, and until when;
                                    requeued: runs that ended without a decision, whose
                                    events wait again for the next run
    ledger/<model>/events/<h>       one event's claim (h = sha256 of its dedupe key);
                                    run_id: the run that covers it, None while it waits
    ledger/<model>/arrivals/<h>     a data object's arrival: what its check found (rows,
                                    or the rule it broke), and what was decided
    ledger/<model>/runs/<run id>    the run: its events, data window, state, its worker
                                    process or pipeline job, and when it started and ended

An event *waits* while its ``run_id`` is None or names a requeued run; it is *covered*
once a run that holds the lease takes it (``collect``). Nothing but a holder's
``collect`` ever covers an event, and only a takeover or an abandon (each one commit with
the lease) requeues a run, so an event is covered by exactly one live run at a time.
No document is rewritten per event except the event's own claim; the model's document is
written per run (acquire, renew, collect, release), well under Firestore's sustained
rate of one write per second per document.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

from retrain.messages import RetrainRequest
from retrain.statedb import Change, Conflict, Database, Doc, retrying

__all__ = [
    "MAX_EVENTS_PER_RUN",
    "Acquired",
    "Claim",
    "FirestoreLedger",
    "Lease",
    "LostLease",
    "Renewal",
    "RunRecord",
    "RunState",
    "event_hash",
    "new_run_id",
]

Claim = Literal["new", "pending", "done"]
RunState = Literal["gathering", "running", "succeeded", "failed", "abandoned"]
Renewal = Literal["held", "released", "lost"]

# A run covers at most this many events (its record lists them); the rest wait for the
# trailing run. Collected in chunks of _CHUNK, each one commit (Firestore allows 500 writes).
MAX_EVENTS_PER_RUN = 1000
_CHUNK = 200


def new_run_id(model: str) -> str:
    return f"{model}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def event_hash(dedupe_key: str) -> str:
    return hashlib.sha256(dedupe_key.encode()).hexdigest()[:40]


class LostLease(LookupError):
    """The run no longer holds its model's lease: it must not gather, launch or run."""


@dataclass(frozen=True)
class Lease:
    run_id: str
    acquired_at: float
    expires_at: float


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
    worker: dict[str, float] | None = None  # the local worker process: pid, create_time
    failed_step: str | None = None  # the step a failed run failed in, from its report

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


def _lease(value: Any) -> Lease | None:
    if not isinstance(value, dict):
        return None
    return Lease(str(value["run_id"]), float(value["acquired_at"]), float(value["expires_at"]))


def _event_entry(request: RetrainRequest) -> dict[str, Any]:
    return {
        "dedupe_key": request.dedupe_key,
        "trigger_event_id": request.trigger_event_id,
        "reason": request.reason,
        "data_uris": request.data_uris,
        "time": request.time.isoformat(),
    }


class FirestoreLedger:
    """The ledger in the ``ledger`` collection of :class:`~retrain.statedb.Database`."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # -- documents -------------------------------------------------------------------

    def _model_doc(self, model: str) -> Any:
        return self.db.doc("ledger", model)

    def _event_doc(self, model: str, dedupe_key: str) -> Any:
        return self.db.doc("ledger", model, "events", event_hash(dedupe_key))

    def _run_doc(self, model: str, run_id: str) -> Any:
        return self.db.doc("ledger", model, "runs", run_id)

    def _arrival_doc(self, model: str, dedupe_key: str) -> Any:
        return self.db.doc("ledger", model, "arrivals", event_hash(dedupe_key))

    def _arrivals(self, model: str) -> Any:
        return self.db.client.collection("ledger", model, "arrivals")

    def _events(self, model: str) -> Any:
        return self.db.client.collection("ledger", model, "events")

    # -- events ----------------------------------------------------------------------

    def claim(self, request: RetrainRequest) -> Claim:
        """Record ``request`` once. ``new``: first sight; ``pending``: seen, waiting for a
        run; ``done``: a run covers it. One create-only write: the hot path of every function.
        """
        ref = self._event_doc(request.model, request.dedupe_key)
        change = Change()
        change.put(Doc(ref, None), self._claim_record(request))
        try:
            self.db.commit(change)
        except Conflict:
            return "pending" if self._waits(request.model, self.db.read(ref)) else "done"
        return "new"

    def _claim_record(self, request: RetrainRequest) -> dict[str, Any]:
        return {
            "request": json.loads(request.model_dump_json()),
            "received_at": self.clock(),
            "run_id": None,
        }

    def _waits(self, model: str, event: Doc) -> bool:
        run_id = event.get("run_id")
        if run_id is None:
            return True
        return run_id in self.db.read(self._model_doc(model)).get("requeued", [])

    def event(self, model: str, dedupe_key: str) -> dict[str, Any] | None:
        return self.db.read(self._event_doc(model, dedupe_key)).data

    def has_pending(self, model: str) -> bool:
        if self.db.read(self._model_doc(model)).get("requeued"):
            return True
        return bool(self.db.query(self._events(model), "run_id", "==", None, limit=1))

    def pending(self, model: str) -> list[RetrainRequest]:
        """Every event that waits for a run, oldest first."""
        requeued = self.db.read(self._model_doc(model)).get("requeued", [])
        found = self.db.query(self._events(model), "run_id", "==", None, limit=10_000)
        for run_id in requeued:
            found += self.db.query(self._events(model), "run_id", "==", run_id, limit=10_000)
        requests = [RetrainRequest.model_validate(d.get("request")) for d in found]
        return sorted(requests, key=lambda r: r.time)

    # -- arrivals that a drift policy checks -----------------------------------------

    def _arrival_record(
        self, request: RetrainRequest, outcome: str | None, checked: dict[str, Any]
    ) -> tuple[Doc, dict[str, Any]]:
        return Doc(self._arrival_doc(request.model, request.dedupe_key), None), {
            **checked,
            "request": json.loads(request.model_dump_json()),
            "object": request.data_uris[0] if request.data_uris else None,
            "received_at": self.clock(),
            "outcome": outcome,
        }

    def record_arrival(
        self, request: RetrainRequest, outcome: str | None = None, **checked: Any
    ) -> Doc | None:
        """An arrival and what its check found (``checked``: rows, bytes and features, or a
        broken rule); ``outcome`` is final at once (``quarantined``) or comes with
        :meth:`settle_arrival`. The record as written the first time (truthy); None when a
        redelivery that checked again found it recorded."""
        doc, record = self._arrival_record(request, outcome, checked)
        change = Change()
        change.put(doc, record)
        try:
            (written,) = self.db.commit(change)
        except Conflict:
            return None
        return Database.written(doc, record, written)

    def claim_arrival(self, request: RetrainRequest, **checked: Any) -> tuple[Doc | None, Claim]:
        """:meth:`record_arrival` (outcome to come) and :meth:`claim`, in one commit when
        both are new (a first delivery); else each on its own, as a redelivery finds them.
        The two create-only writes commit together or not at all, so no state arises that
        the two commits one after the other could not leave (a crash between them leaves
        the record without the claim; the redelivery claims it)."""
        arrival, record = self._arrival_record(request, None, checked)
        claim = Doc(self._event_doc(request.model, request.dedupe_key), None)
        change = Change()
        change.put(arrival, record)
        change.put(claim, self._claim_record(request))
        try:
            written, _ = self.db.commit(change)
        except Conflict:  # one of them exists: a redelivery, or a delivery racing this one
            return self.record_arrival(request, **checked), self.claim(request)
        return Database.written(arrival, record, written), "new"

    def queue_arrival(
        self, request: RetrainRequest, head: Doc, outcome: str, **checked: Any
    ) -> Lease | None:
        """Record the arrival as settled (``outcome``) and claim it, in one commit, behind
        the run whose lease ``head`` shows (the model's document, as read before the check,
        :meth:`arrival_and_head`). The commit verifies that ``head`` is unchanged, so at
        its instant that run held the lease: the state that :meth:`claim`, then a read of
        the lease, would find, in one round trip instead of three (a run that collects later
        covers the event; one that collected before holds the lease, and its trailing run
        covers it). The lease queued behind; None, with nothing written, if ``head`` shows
        no live lease, or the commit failed (the lease moved, or another delivery of this
        arrival got there first): then the arrival takes :meth:`claim_arrival`'s path."""
        held = _lease(head.get("lease"))
        if held is None or held.expires_at <= self.clock():
            return None
        arrival, record = self._arrival_record(request, outcome, checked)
        change = Change()
        change.put(arrival, {**record, "settled_at": record["received_at"]})
        change.put(Doc(self._event_doc(request.model, request.dedupe_key), None),
                   self._claim_record(request))  # fmt: skip
        change.verify(head, "lease")
        try:
            self.db.commit(change)
        except Conflict:
            return None
        return held

    def settle_arrival(
        self, request: RetrainRequest, outcome: str, recorded: Doc | None = None, **extra: Any
    ) -> bool:
        """What the check of an arrival decided (``no_drift``, ``drift``, ``first_model``...);
        the first settlement stands. False if another delivery settled it first.

        ``recorded``: the record as this caller wrote it (:meth:`record_arrival`), with
        the time of that write. The first attempt is guarded by that time instead of a
        read: it commits only if the record is still exactly as written, unsettled (written
        with no outcome); any other write in between fails it, and it reads and decides
        again, as without ``recorded``."""
        ref = self._arrival_doc(request.model, request.dedupe_key)
        known = [recorded] if recorded is not None and recorded.update_time is not None else []

        def attempt() -> bool:
            found = known.pop() if known else self.db.read(ref)
            if found.get("outcome") is not None:
                return False
            change = Change()
            change.put(found, {**extra, "outcome": outcome, "settled_at": self.clock()})
            self.db.commit(change)
            return True

        return retrying(attempt, f"settle arrival {request.dedupe_key}")

    def arrival(self, model: str, dedupe_key: str) -> dict[str, Any] | None:
        return self.db.read(self._arrival_doc(model, dedupe_key)).data

    def arrival_and_head(self, model: str, dedupe_key: str) -> tuple[dict[str, Any] | None, Doc]:
        """The arrival's record (None if absent) and the model's document (its lease), in
        one round trip; the document is what :meth:`queue_arrival` queues behind."""
        arrival, head = self._arrival_doc(model, dedupe_key), self._model_doc(model)
        found = {doc.ref.path: doc for doc in self.db.read_many([arrival, head])}
        return found[arrival.path].data, found[head.path]

    def arrivals(self, model: str, dedupe_keys: list[str]) -> dict[str, dict[str, Any]]:
        """The recorded arrivals among ``dedupe_keys``, by key (one batched read)."""
        refs = [self._arrival_doc(model, key) for key in dedupe_keys]
        found = {doc.ref.path: doc.data for doc in self.db.read_many(refs) if doc.exists}
        return {
            key: data
            for key, ref in zip(dedupe_keys, refs, strict=True)
            if (data := found.get(ref.path)) is not None
        }

    def quarantined(self, model: str) -> list[dict[str, Any]]:
        """The arrivals of ``model`` that broke a rule and were not released, oldest first."""
        found = self.db.query(self._arrivals(model), "outcome", "==", "quarantined", 10_000)
        return sorted((doc.data or {} for doc in found), key=lambda d: d.get("received_at", 0))

    def release(self, model: str, uri: str, by: str) -> dict[str, Any] | None:
        """Readmit the quarantined object ``uri`` (every generation of it that is held):
        later data windows include it. The released arrival, or None if none is held."""

        def attempt() -> dict[str, Any] | None:
            held = [
                doc
                for doc in self.db.query(self._arrivals(model), "object", "==", uri, 100)
                if doc.get("outcome") == "quarantined"
            ]
            if not held:
                return None
            change = Change()
            for doc in held:
                change.put(doc, {"outcome": "released", "released_by": by,
                                 "released_at": self.clock()})  # fmt: skip
            self.db.commit(change)
            return held[-1].data

        return retrying(attempt, f"release {uri}")

    # -- the lease -------------------------------------------------------------------

    def lease(self, model: str) -> Lease | None:
        return _lease(self.db.read(self._model_doc(model)).get("lease"))

    def _new_lease(self, run_id: str, ttl: float) -> dict[str, Any]:
        now = self.clock()
        return {"run_id": run_id, "acquired_at": now, "expires_at": now + ttl}

    def acquire(self, model: str, run_id: str, ttl: float) -> Acquired:
        """Take the model's lease for ``run_id`` if no run holds it (one commit, with the
        run's record)."""

        def attempt() -> Acquired:
            doc = self.db.read(self._model_doc(model))
            held = _lease(doc.get("lease"))
            if held is not None:
                return Acquired(held.run_id == run_id, held.run_id)
            run = self.db.read(self._run_doc(model, run_id))
            if run.exists:  # ours, from an attempt whose answer was lost, since released
                return Acquired(False, None)
            change = Change()
            change.put(doc, {"lease": self._new_lease(run_id, ttl)})
            change.put(run, asdict(RunRecord(model, run_id, "gathering", created_at=self.clock())))
            self.db.commit(change)
            return Acquired(True, run_id)

        return retrying(attempt, f"acquire the lease of {model}")

    def take_over(self, model: str, holder: str, run_id: str, ttl: float, why: str) -> bool:
        """``holder`` is dead (its worker or job ended without a report): in one commit,
        end it as abandoned, requeue its events, and give the lease to ``run_id``. False if
        ``holder`` no longer holds the lease (another caller acted first)."""

        def attempt() -> bool:
            doc = self.db.read(self._model_doc(model))
            held = _lease(doc.get("lease"))
            if held is None or held.run_id != holder:
                return held is not None and held.run_id == run_id  # a lost answer: ours
            old = self.db.read(self._run_doc(model, holder))
            new = self.db.read(self._run_doc(model, run_id))
            now = self.clock()
            requeued = [r for r in doc.get("requeued", []) if r != holder] + [holder]
            change = Change()
            change.put(doc, {"lease": self._new_lease(run_id, ttl), "requeued": requeued})
            change.put(old, self._ended(old, model, holder, "abandoned", why, now))
            change.put(new, asdict(RunRecord(model, run_id, "gathering", created_at=now)))
            self.db.commit(change)
            return True

        return retrying(attempt, f"take over the lease of {model}")

    def renew(self, model: str, run_id: str, ttl: float) -> Renewal:
        """Extend ``run_id``'s lease to now + ``ttl``. ``released``: the run ended (its
        report released the lease); ``lost``: another run holds it, or none does while
        this run never ended; either way this run must stop holding the model."""
        return self.attach(model, run_id, ttl, {})

    def attach(self, model: str, run_id: str, ttl: float, fields: dict[str, Any]) -> Renewal:
        """:meth:`renew`, and write ``fields`` into the run's record in the same commit (the
        local worker records its process this way)."""

        def attempt() -> Renewal:
            doc = self.db.read(self._model_doc(model))
            held = _lease(doc.get("lease"))
            run = self.db.read(self._run_doc(model, run_id))
            if held is None or held.run_id != run_id:
                return "released" if run.get("finished_at") is not None else "lost"
            now = self.clock()
            change = Change()
            change.put(doc, {"lease": {**asdict(held), "expires_at": now + ttl}})
            if fields:
                change.put(run, fields)
            self.db.commit(change)
            return "held"

        return retrying(attempt, f"renew the lease of {model} for {run_id}")

    # -- a run's life ----------------------------------------------------------------

    def collect(
        self, model: str, run_id: str, limit: int = MAX_EVENTS_PER_RUN
    ) -> list[RetrainRequest]:
        """Take every waiting event (up to ``limit``) into run ``run_id``, which must hold
        the lease (:class:`LostLease` otherwise). Each chunk is one commit that covers the
        events and lists them in the run's record; events of requeued runs come first."""
        taken: list[RetrainRequest] = []
        while len(taken) < limit:
            size = min(_CHUNK, limit - len(taken))
            chunk = retrying(
                lambda size=size: self._collect_chunk(model, run_id, size),  # type: ignore[misc]
                f"collect the events of {model} into {run_id}",
            )
            if not chunk:
                break
            taken += chunk
        return sorted(taken, key=lambda r: r.time)

    def _collect_chunk(self, model: str, run_id: str, size: int) -> list[RetrainRequest]:
        doc = self.db.read(self._model_doc(model))
        held = _lease(doc.get("lease"))
        if held is None or held.run_id != run_id:
            raise LostLease(f"run {run_id} no longer holds the lease of {model}")
        run = self.db.read(self._run_doc(model, run_id))
        requeued: list[str] = list(doc.get("requeued", []))
        events: list[Doc] = []
        drained = []
        for old in requeued:
            found = self.db.query(self._events(model), "run_id", "==", old, size - len(events))
            events += found
            if len(events) >= size:
                break
            drained.append(old)  # fewer than asked: none of its events is left
        if len(events) < size:
            events += self.db.query(self._events(model), "run_id", "==", None, size - len(events))
        now = self.clock()
        change = Change()
        # The lease document is always written: the commit fails if the lease moved.
        change.put(doc, {"requeued": [r for r in requeued if r not in drained],
                         "collected_at": now})  # fmt: skip
        requests = [RetrainRequest.model_validate(e.get("request")) for e in events]
        for event in events:
            change.put(event, {"run_id": run_id, "covered_at": now})
        record = RunRecord.from_dict(run.data or {"model": model, "run_id": run_id,
                                                  "state": "gathering"})  # fmt: skip
        record.events += [_event_entry(r) for r in requests]
        if record.events and not record.request_id:
            first = min(requests, key=lambda r: r.time)
            record.request_id, record.reason = first.dedupe_key, first.reason
        change.put(run, asdict(record))
        self.db.commit(change)
        return requests

    def start(self, model: str, run_id: str, data_uris: list[str]) -> None:
        """The run trains on ``data_uris``; :class:`LostLease` if it no longer holds the lease."""

        def attempt() -> None:
            doc = self.db.read(self._model_doc(model))
            held = _lease(doc.get("lease"))
            if held is None or held.run_id != run_id:
                raise LostLease(f"run {run_id} no longer holds the lease of {model}")
            run = self.db.read(self._run_doc(model, run_id))
            change = Change()
            change.guard(doc, self.clock())
            change.put(run, {"state": "running", "started_at": self.clock(),
                             "data_uris": data_uris})  # fmt: skip
            self.db.commit(change)

        retrying(attempt, f"start {run_id}")

    def adopt(self, model: str, run_id: str, reason: str, request_id: str) -> None:
        """Record run ``run_id``, which a pipeline schedule started outside the ledger, as
        running (it holds no lease and covers no event), so that its report is decided."""
        now = self.clock()
        change = Change()
        change.put(
            Doc(self._run_doc(model, run_id), None),
            asdict(RunRecord(model, run_id, "running", reason=reason, request_id=request_id,
                             created_at=now, started_at=now, launched_as="pipeline schedule")),
        )  # fmt: skip
        with contextlib.suppress(Conflict):  # adopted already (a redelivery)
            self.db.commit(change)

    def launched(self, model: str, run_id: str, job: str) -> None:
        """Record which pipeline job ``run_id`` submitted (the cloud launchers)."""

        def attempt() -> None:
            run = self.db.read(self._run_doc(model, run_id))
            change = Change()
            change.put(run, {"launched_as": job})
            self.db.commit(change)

        retrying(attempt, f"record the job of {run_id}")

    def _ended(
        self, run: Doc, model: str, run_id: str, state: RunState, error: str | None, now: float,
        failed_step: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The fields that end ``run`` (its first end stands; finished_at is set once)."""
        if not run.exists:
            return asdict(RunRecord(model, run_id, state, created_at=now, ended_at=now,
                                    error=error, finished_at=now,
                                    failed_step=failed_step))  # fmt: skip
        ended: dict[str, Any] = {}
        if run.get("ended_at") is None:
            ended |= {"state": state, "ended_at": now, "error": error, "failed_step": failed_step}
        if run.get("finished_at") is None:
            ended["finished_at"] = now
        return ended or {"finished_at": run.get("finished_at")}

    def close(
        self, change: Change, model: str, run_id: str, state: RunState, error: str | None,
        *, requeue: bool = False, failed_step: str | None = None,
    ) -> bool:  # fmt: skip
        """Add to ``change`` the writes that end ``run_id`` and release its lease if it holds
        it; with ``requeue`` its events wait again; ``failed_step``: where a failed run
        failed. True if it held the lease. The gatekeeper commits these with its decision,
        as one."""
        doc = self.db.read(self._model_doc(model))
        run = self.db.read(self._run_doc(model, run_id))
        held = _lease(doc.get("lease"))
        holds = held is not None and held.run_id == run_id
        update: dict[str, Any] = {}
        if holds:
            update["lease"] = None
        if requeue:
            update["requeued"] = [r for r in doc.get("requeued", []) if r != run_id] + [run_id]
        # Always written, so that a takeover or a collect in between fails this commit.
        change.put(doc, {**update, "closed_at": self.clock()})
        change.put(run, self._ended(run, model, run_id, state, error, self.clock(), failed_step))
        return holds

    def finish(self, model: str, run_id: str, state: RunState, error: str | None = None) -> bool:
        """End ``run_id`` and release the lease if it still holds it; True if it did."""

        def attempt() -> bool:
            change = Change()
            holds = self.close(change, model, run_id, state, error)
            self.db.commit(change)
            return holds

        return retrying(attempt, f"finish {run_id}")

    def abandon(self, model: str, run_id: str, error: str) -> bool:
        """``run_id`` will never run (its launch failed, or it lost its worker): end it as
        abandoned, requeue its events for the next run, and release the lease if it holds
        it; True if it did. Nothing it covered is lost."""

        def attempt() -> bool:
            change = Change()
            holds = self.close(change, model, run_id, "abandoned", error, requeue=True)
            self.db.commit(change)
            return holds

        return retrying(attempt, f"abandon {run_id}")

    # -- runs ------------------------------------------------------------------------

    def run(self, model: str, run_id: str) -> RunRecord | None:
        found = self.db.read(self._run_doc(model, run_id))
        return RunRecord.from_dict(found.data) if found.data is not None else None

    def runs(self, model: str) -> list[RunRecord]:
        records = [
            RunRecord.from_dict(d.data or {})
            for d in self.db.all(self.db.client.collection("ledger", model, "runs"))
        ]
        return sorted(records, key=lambda r: r.created_at)
