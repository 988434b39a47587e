"""The core behind the Cloud Functions: events in, at most one run per model out.

Each handler gets an already-decoded event, decides, and returns an :class:`Outcome`
that the function logs as one line. It never waits for a pipeline: a launch starts a
worker and returns. A malformed event raises :class:`~retrain.events.EventError` (the
function acks it); anything else propagates, so Pub/Sub retries and then dead-letters.

A lease is taken over only from a run whose pipeline is no longer running: the launcher
is asked (:meth:`~pipelines.launch.PipelineLauncher.state`). A run whose pipeline runs
keeps its lease however long it takes (the sweep extends it); one whose pipeline ended
is decided from the report it kept, if any, and taken over otherwise.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from components.artifacts import MODEL_FILE
from retrain.config import ModelSettings, Settings
from retrain.events import (
    DEDUPE_ATTRIBUTE,
    EventError,
    ObjectEvent,
    PubsubMessage,
    check_data_uris,
    json_object,
)
from retrain.gatekeeper.decisions import Gatekeeper, Refusal, report_of
from retrain.ledger import Acquired, Claim, Lease, new_run_id
from retrain.messages import (
    Decision,
    DriftAlert,
    MetricsReport,
    RetrainRequest,
    ScheduleMessage,
)

if TYPE_CHECKING:
    from pipelines.launch import PipelineLauncher
    from retrain.bus import Bus
    from retrain.gatekeeper.registry import FirestoreRegistry
    from retrain.ledger import FirestoreLedger, RunRecord
    from retrain.monitoring import Monitor, MonitorPass
    from retrain.statedb import Doc
    from serving.vertex_endpoint import Serving

__all__ = [
    "GATHER_SECONDS",
    "RECOVER_PER_SWEEP",
    "SAMPLE_BYTES",
    "UNSETTLED_SECONDS",
    "Outcome",
    "RetrainService",
    "build_service",
    "gathering_lease",
    "sample_object",
]

Action = Literal[
    "launched", "queued", "duplicate", "ignored", "checked", "quarantined", "decided", "refused"
]


# A sweep checks at most this many objects per model whose arrival was never recorded, or
# whose check was left unfinished for UNSETTLED_SECONDS (its deliveries are over by then).
RECOVER_PER_SWEEP = 50
UNSETTLED_SECONDS = 600.0

# How long a run may take, past the coalescing window, to gather its events and launch.
GATHER_SECONDS = 300.0

# An arriving object bigger than this is checked on a sample of about this size: its first
# rows (a CSV's first SAMPLE_BYTES, decompressed, cut at a line end; a Parquet file's first row
# groups), not read whole. This bounds what the check holds in the function's memory
# (docs/deploy-gcp.md, "Function memory"); validation.max_object_bytes still quarantines an
# object too big to train on. Its rows are then estimated from the sample (exact for Parquet).
SAMPLE_BYTES = 32 * 1024 * 1024
_GZIP = b"\x1f\x8b"
_CSV_SAMPLED = ("", ".csv", ".txt", ".gz")  # suffixes whose head can be read alone


def gathering_lease(model: ModelSettings) -> float:
    return min(model.lease_seconds, model.coalesce_seconds + GATHER_SECONDS)


@dataclass(frozen=True)
class Outcome:
    action: Action
    model: str | None = None
    run_id: str | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def log_fields(self) -> dict[str, Any]:
        fields = {"action": self.action, "model": self.model, "run_id": self.run_id}
        return {k: v for k, v in {**fields, "detail": self.detail, **self.extra}.items() if v}


class RetrainService:
    def __init__(
        self,
        settings: Settings,
        ledger: FirestoreLedger,
        launcher: PipelineLauncher,
        bus: Bus,
        registry: FirestoreRegistry,
        serving: Serving | None = None,
        storage: Any | None = None,
    ) -> None:
        """``serving`` deploys a promoted version (Vertex AI endpoints); None where the
        prediction server follows the decisions topic by itself (the local stack).
        ``storage`` reads arriving objects (default: a ``google.cloud.storage.Client``)."""
        self.settings = settings
        self.ledger = ledger
        self.launcher = launcher
        self.bus = bus
        self.registry = registry
        self.serving = serving
        self.gatekeeper = Gatekeeper(settings, ledger, registry, bus, launcher.scheduled)
        self._champions: dict[tuple[str, str], tuple[dict[str, Any], Any, dict[str, float]]] = {}
        self._storage = storage
        self._monitor: Monitor | None = None

    # -- the one path to a run -----------------------------------------------------

    def request(self, request: RetrainRequest) -> Outcome:
        """Claim the request once; launch a run if the model has none, else leave it queued."""
        return self._claim(request)[1]

    def _claim(self, request: RetrainRequest) -> tuple[Claim, Outcome]:
        model = self._model(request.model)
        check_data_uris(self.settings, request.model, request.data_uris, "data_uris")
        return self._claimed(request, model, self.ledger.claim(request))

    def _claimed(
        self, request: RetrainRequest, model: ModelSettings, claim: Claim
    ) -> tuple[Claim, Outcome]:
        """What follows the claim of ``request``: a run is started if none holds the lease.
        The lease is looked at only after the claim committed: a run that collects after
        that sees the event; one that collected before still holds the lease, and this
        event waits for its trailing run (read before the claim, a lease could be released
        in between, and the event wait with no run to come)."""
        if claim == "done":
            done = Outcome("duplicate", request.model, detail=f"{request.dedupe_key} already run")
            return claim, done
        outcome = self.kick(request.model, model)
        if claim == "pending" and outcome.action == "queued":
            return claim, Outcome("duplicate", request.model, detail=f"{request.dedupe_key} queued")
        return claim, outcome

    def kick(self, name: str, model: ModelSettings | None = None, *, look: bool = False) -> Outcome:
        """Start a run for ``name`` if none holds its lease; the run gathers what waits.

        A lease that expired (or any lease, with ``look``: the sweep) is looked at: its
        holder keeps it while its pipeline runs, is decided from its kept report if its
        pipeline ended after reporting, and is taken over otherwise."""
        model = model or self._model(name)
        run_id = new_run_id(name)
        ttl = gathering_lease(model)  # the launcher (or worker) extends it once it runs
        held = self.ledger.lease(name)
        if held is None:
            lease = self.ledger.acquire(name, run_id, ttl)
        elif look or held.expires_at <= self.ledger.clock():
            lease = self._look_at(name, model, held, run_id, ttl)
        else:
            return Outcome("queued", name, detail=f"run {held.run_id} is in flight")
        if not lease.acquired:
            return Outcome("queued", name, detail=f"run {lease.holder or '?'} is in flight")
        try:
            self.launcher.submit(name, run_id)
        except Exception as exc:
            self._launch_failed(name, run_id, exc)
            raise
        return Outcome("launched", name, run_id=run_id)

    def _launch_failed(self, name: str, run_id: str, exc: Exception) -> None:
        """The lease must not outlive a launch that never happened, and the events the run
        gathered wait again: the redelivery that this error causes launches them. But a
        submit whose answer was lost may have started the job: only a launcher that says
        there is none lets the run be abandoned; otherwise the sweep looks at it later."""
        record = self.ledger.run(name, run_id)
        try:
            absent = record is None or self.launcher.state(name, record) == "absent"
        except Exception:  # noqa: BLE001 (unknown: keep the run; the sweep asks again)
            absent = False
        if absent:
            self.ledger.abandon(name, run_id, f"launch failed: {type(exc).__name__}: {exc}")

    def _look_at(
        self, name: str, model: ModelSettings, held: Lease, run_id: str, ttl: float
    ) -> Acquired:
        """Decide what becomes of ``held``; the lease for ``run_id`` if it was freed."""
        holder = self.ledger.run(name, held.run_id)
        if holder is not None and holder.finished_at is not None:  # reported: release it
            self.ledger.finish(name, held.run_id, holder.state)
            return self.ledger.acquire(name, run_id, ttl)
        state = self.launcher.state(name, holder) if holder is not None else "absent"
        if state == "running":
            self.ledger.renew(name, held.run_id, model.lease_seconds)  # extend it
            return Acquired(False, held.run_id)
        if state == "absent" and held.expires_at > self.ledger.clock():
            return Acquired(False, held.run_id)  # still gathering, or about to submit
        why = (
            f"its pipeline {'ended' if state == 'ended' else 'never started'} without a "
            f"report (lease until {held.expires_at:.0f})"
        )
        kept = report_of(self.settings, name, held.run_id)
        if kept is not None:  # it reported; the message was lost or is on its way
            if isinstance(kept, str):  # kept, but not a valid report: the run failed
                kept = self._invalid(name, held.run_id, holder, kept)
            decided = self.report(kept)
            if decided.action != "refused":
                return self.ledger.acquire(name, run_id, ttl)
            why = f"its pipeline ended; its report was refused: {decided.detail}"
        if self.ledger.take_over(name, held.run_id, run_id, ttl, why):
            return Acquired(True, run_id)
        return Acquired(False, None)

    @staticmethod
    def _invalid(model: str, run_id: str, holder: RunRecord | None, why: str) -> MetricsReport:
        """The failure report of a run whose kept report is not a valid one."""
        reason = holder.reason if holder and holder.reason else "manual"
        return MetricsReport(
            model=model, run_id=run_id, request_id=(holder.request_id if holder else "") or run_id,
            reason=reason if reason in ("data", "drift", "schedule", "manual") else "manual",
            status="failed", error=why, failed_step="report",
        )  # fmt: skip

    def _model(self, name: str) -> ModelSettings:
        try:
            return self.settings.models[name]
        except KeyError as exc:
            known = ", ".join(sorted(self.settings.models))
            raise EventError(f"model {name!r} is not in retrain.yaml (models: {known})") from exc

    # -- the functions -------------------------------------------------------------

    def data_arrival(self, event: ObjectEvent) -> Outcome:
        outcome = self._data_arrival(event)
        return Outcome(
            outcome.action,
            outcome.model,
            outcome.run_id,
            outcome.detail,
            {"object": event.uri, "generation": event.generation, **outcome.extra},
        )

    def _data_arrival(self, event: ObjectEvent) -> Outcome:
        if not event.is_finalize:
            return Outcome("ignored", detail=f"{event.kind} of {event.uri} is not a finalize")
        if event.name.endswith("/"):
            return Outcome("ignored", detail=f"{event.uri} is a folder")
        if event.name.startswith("gcloud/tmp/"):
            return Outcome("ignored", detail=f"{event.uri} is a gcloud temporary object")
        name = self.settings.model_for_object(event.bucket, event.name)
        if name is None:
            return Outcome("ignored", detail=f"{event.uri} belongs to no model's data prefix")
        request = RetrainRequest(
            model=name,
            reason="data",
            data_uris=[event.uri],
            dedupe_key=event.dedupe_key,
            trigger_event_id=event.event_id,
        )
        seen, head = self.ledger.arrival_and_head(name, request.dedupe_key)
        if seen is not None and seen.get("outcome") is not None:
            return Outcome("duplicate", name, detail=f"{event.dedupe_key} {seen['outcome']}")
        return self._check_arrival(request, self.settings.models[name], event, head)

    def drift_alert(self, message: PubsubMessage) -> Outcome:
        payload = json_object(message)
        if "incident" in payload:  # a Cloud Monitoring alert, e.g. from Vertex Model Monitoring
            incident = payload["incident"]
            if isinstance(incident, dict) and incident.get("state", "open") != "open":
                return Outcome("ignored", detail=f"incident {incident.get('incident_id')} closed")
            name, summary, uris = self._incident(incident, message.message_id)
        else:
            try:
                alert = DriftAlert.model_validate(payload)
            except ValidationError as exc:
                raise EventError(f"message {message.message_id}: not a drift alert: {exc}") from exc
            name, summary, uris = alert.model, alert.summary, alert.data_uris
        request = RetrainRequest(
            model=name,
            reason="drift",
            data_uris=uris,
            dedupe_key=message.dedupe_key,
            trigger_event_id=message.message_id,
        )
        outcome = self.request(request)
        return Outcome(outcome.action, name, outcome.run_id, outcome.detail, {"alert": summary})

    @staticmethod
    def _incident(incident: Any, message_id: str) -> tuple[str, str, list[str]]:
        labels = incident.get("policy_user_labels", {}) if isinstance(incident, dict) else {}
        name = labels.get("retrain_model") if isinstance(labels, dict) else None
        if not isinstance(name, str) or not name:
            raise EventError(
                f"message {message_id}: alert incident has no policy user label 'retrain_model' "
                "naming the model to retrain"
            )
        return name, str(incident.get("summary", "monitoring alert")), []

    def schedule(self, message: PubsubMessage) -> Outcome:
        payload = json_object(message)
        try:
            tick = ScheduleMessage.model_validate(payload)
        except ValidationError as exc:
            raise EventError(
                f"message {message.message_id}: not a schedule message: {exc}"
            ) from exc
        if tick.reason == "sweep":
            return self.sweep()
        if tick.reason == "monitor":
            return self.monitor()
        request = RetrainRequest(
            model=tick.model,
            reason=tick.reason,
            data_uris=tick.data_uris,
            dedupe_key=tick.dedupe_key or message.dedupe_key,
            trigger_event_id=message.message_id,
        )
        return self.request(request)

    def sweep(self) -> Outcome:
        """Look at every model: a lease holder whose pipeline still runs keeps its lease
        (extended); one whose pipeline ended is decided from its kept report, or taken
        over (its events run again); a model whose events wait gets a run. One model's
        failure does not stop the others."""
        outcomes: dict[str, str] = {}
        launched: dict[str, str | None] = {}
        for name in self.settings.models:
            try:
                if found := self._recover_arrivals(name):
                    outcomes[name] = f"{found} unrecorded arrivals checked; "
            except Exception as exc:  # noqa: BLE001 (in the log line; the next sweep retries)
                outcomes[name] = f"unrecorded arrivals: {type(exc).__name__}: {exc}; "
            if self.ledger.lease(name) is None and not self.ledger.has_pending(name):
                continue
            try:
                outcome = self.kick(name, look=True)
            except Exception as exc:  # noqa: BLE001 (in the log line; the next sweep retries)
                outcomes[name] = outcomes.get(name, "") + f"failed: {type(exc).__name__}: {exc}"
                continue
            outcomes[name] = (
                outcomes.get(name, "") + f"{outcome.action} {outcome.run_id or outcome.detail}"
            )
            if outcome.action == "launched":
                launched[name] = outcome.run_id
        detail = "; ".join(f"{name}: {what}" for name, what in outcomes.items())
        return Outcome(
            "checked", detail=f"sweep: {detail or 'nothing waits'}", extra={"launched": launched}
        )

    # -- the monitor: serving drift, live metrics, canaries (retrain/monitoring.py) ---------

    def monitor(self, models: list[str] | None = None) -> Outcome:
        """One pass of the monitor over every model (or ``models``); one model's failure
        does not stop the others (it is in the log line; the next pass tries again)."""
        passes = self.monitor_passes(models)
        detail = "; ".join(
            f"{name}: {found if isinstance(found, str) else found.summary()}"
            for name, found in passes.items()
        )
        alerts = {
            name: [a["key"] for a in found.alerts if a.get("message_id")]
            for name, found in passes.items()
            if not isinstance(found, str) and any(a.get("message_id") for a in found.alerts)
        }
        return Outcome("checked", detail=f"monitor: {detail or 'no models'}",
                       extra={"alerts": alerts})  # fmt: skip

    def monitor_passes(self, models: list[str] | None = None) -> dict[str, MonitorPass | str]:
        """Each model's pass (:class:`~retrain.monitoring.MonitorPass`), or why it failed."""
        for name in models or []:
            self._model(name)
        found: dict[str, MonitorPass | str] = {}
        for name in models or list(self.settings.models):
            try:
                found[name] = self.monitoring.check(name)
            except Exception as exc:  # noqa: BLE001 (in the log line; the next pass retries)
                found[name] = f"failed: {type(exc).__name__}: {exc}"
        return found

    @property
    def monitoring(self) -> Monitor:
        """The monitor (made on first use; it keeps what it read: champions' metadata and
        parsed labels objects)."""
        if self._monitor is None:
            from retrain.monitoring import Monitor  # noqa: PLC0415

            self._monitor = Monitor(
                self.settings, self.registry.db, self.registry, self.storage,
                self._monitor_alert, self,
            )  # fmt: skip
        return self._monitor

    def settle_canary(self, model: str, live: dict[str, dict[str, float]]) -> Decision | None:
        """The monitor's judge: the gatekeeper completes or rolls back ``model``'s canary on
        ``live`` (:meth:`~retrain.gatekeeper.decisions.Gatekeeper.settle_canary`, which also
        finishes a Decision kept but not published), then the endpoint (if any) serves it."""
        decision = self.gatekeeper.settle_canary(model, live)
        if decision is not None:
            self._serve(decision)
        return decision

    def _monitor_alert(self, alert: DriftAlert, key: str) -> str | None:
        """Claim the alert's run under ``key`` (the model and the window), then publish it
        with that key, as :meth:`_alert` does for an arrival: a second pass, or a replay,
        claims nothing new and publishes nothing. The message id, or None."""
        claim, _ = self._claim(
            RetrainRequest(
                model=alert.model, reason="drift", dedupe_key=key, trigger_event_id=key,
            )
        )  # fmt: skip
        if claim != "new":
            return None
        return self.bus.publish(
            self.settings.topics.drift_alerts, alert, model=alert.model,
            **{DEDUPE_ATTRIBUTE: key},
        )  # fmt: skip

    def _recover_arrivals(self, name: str) -> int:
        """Check the model's objects whose arrival was never recorded (their notification
        was lost: a Pub/Sub outage, a stack that was down), or whose check never finished
        (its deliveries gave up mid-way, :data:`UNSETTLED_SECONDS` ago), as their
        notification would have; at most :data:`RECOVER_PER_SWEEP` per sweep. How many."""
        from retrain.data_objects import newest_objects, object_key  # noqa: PLC0415

        bucket = self.settings.buckets.data
        blobs = newest_objects(self.settings, name, self.storage)
        keys = [object_key(bucket, blob.name, blob.generation) for blob in blobs]
        known = self.ledger.arrivals(name, keys)
        stale = self.ledger.clock() - UNSETTLED_SECONDS
        lost = [
            (blob, key)
            for blob, key in zip(blobs, keys, strict=True)
            if key not in known
            or (known[key].get("outcome") is None and known[key].get("received_at", 0) < stale)
        ]
        for blob, key in lost[:RECOVER_PER_SWEEP]:
            event = ObjectEvent(f"sweep:{key}", "OBJECT_FINALIZE", bucket, blob.name,
                                str(blob.generation))  # fmt: skip
            self.data_arrival(event)
        return min(len(lost), RECOVER_PER_SWEEP)

    def report(self, report: MetricsReport) -> Outcome:
        """A run ended: decide on its candidate (which ends the run and releases its lease,
        in one commit); one trailing run covers whatever arrived meanwhile; then the
        endpoint (if any) serves a promotion. The deploy comes last: it may wait minutes,
        and the next run must not wait for it."""
        self._model(report.model)
        result = self.gatekeeper.report(report)
        if isinstance(result, Refusal):
            return Outcome("refused", report.model, report.run_id, result.why)
        extra = {"verdict": result.verdict, "version": result.new_version}
        detail = "; ".join(result.reasons)
        if self.ledger.has_pending(report.model):
            trailing = self.kick(report.model)
            detail = f"trailing run {trailing.run_id or '(queued)'}; {detail}"
        self._serve(result)  # a deploy that failed on an earlier delivery is tried again
        return Outcome("decided", report.model, report.run_id, detail, extra)

    def _serve(self, decision: Decision) -> None:
        """Deploy what a decision put in the champion pointer, if it is still there (a
        redelivered old decision must not undo a later promotion or rollback).

        - ``promoted`` (by the gate, or a canary that completed): the new version;
        - ``canary``: the new version at ``gate.canary.percent`` beside the previous
          champion, while the pointer's canary is still this version's;
        - ``rolled_back`` (a canary judged worse): the previous champion, in full (the
          rollback path: it still serves its share, so only the traffic moves, and the
          canary is undeployed after).

        The share follows the pointer: a canary's share while its canary lasts, all
        traffic once it is over. A model with ``gate.canary`` ignores the static
        ``gcp.endpoint.canary_percent`` (which applies to the other models' promotions).
        Also the monitor's canary Decisions come through here (on Vertex AI)."""
        if self.serving is None:
            return
        if decision.verdict in ("promoted", "canary"):
            target = decision.new_version
        elif decision.verdict == "rolled_back":
            target = decision.previous_champion
        else:
            return
        champion = self.registry.champion(decision.model)
        if target is None or champion is None or champion.version != target:
            return
        canary = self.registry.canary(decision.model)
        spec = self.settings.models[decision.model].gate.canary
        if canary is not None and canary.version == target:
            share: int | None = canary.percent
        else:
            share = None if spec is None else 0
        self.serving.deploy(decision.model, target, share)

    # -- every arrival is checked; some policies look for drift ---------------------

    def _check_arrival(
        self, request: RetrainRequest, model: ModelSettings, event: ObjectEvent, head: Doc
    ) -> Outcome:
        """Check the object against the rules (``components.preprocess.validation``): one
        that breaks one is quarantined; one that passes is recorded with its rows (the data
        window counts them) and handled as the model's arrival policy says. A duplicate
        delivery during the check checks again and finds the same: the first record and
        the first settlement stand.

        An arrival that is to run while a run holds the model's lease (``head``, the
        model's document as read with the arrival's record) is recorded, settled and claimed
        behind that run in one commit (:meth:`~retrain.ledger.FirestoreLedger.queue_arrival`);
        otherwise it is recorded and claimed, a run is started if none holds the lease, and
        then it is settled."""
        from components.preprocess.validation import ValidationError  # noqa: PLC0415

        try:
            checked = self._read_checked(event, model)
        except ValidationError as exc:
            return self._quarantine(request, exc)
        if checked is None:
            self.ledger.record_arrival(request, "gone")
            return Outcome("ignored", request.model, detail=f"{event.uri}#{event.generation} "
                           "no longer exists")  # fmt: skip
        frame, features, size, rows = checked
        fields = {"rows": rows, "bytes": size, "features": list(features)}
        if rows != len(frame):  # checked on a sample; rows is an estimate
            fields["sampled_rows"] = len(frame)
        every = model.arrival_policy == "every_arrival"
        champion = None if every else self.registry.champion(request.model)
        if champion is None:  # every arrival runs; or the first model needs this data
            settled = "accepted" if every else "first_model"
            return self._run_arrival(request, model, head, settled, fields)
        try:
            kind, reasons, details = self._drift(request.model, model, champion, frame, features)
        except ValueError as exc:  # e.g. labels the champion does not know
            return self._quarantine(
                request, ValidationError(event.uri, [], "unscorable", str(exc)), size
            )
        recorded = self.ledger.record_arrival(request, **fields)
        if not reasons:
            summary = details["drift"].summary()
            self.ledger.settle_arrival(request, "no_drift", recorded, summary=summary)
            return Outcome("checked", request.model, detail=f"no drift: {summary}")
        return self._alert(request, event, kind, reasons, details, champion.version, recorded)

    def _run_arrival(
        self, request: RetrainRequest, model: ModelSettings, head: Doc, settled: str,
        fields: dict[str, Any],
    ) -> Outcome:  # fmt: skip
        """Claim a checked arrival's run: behind the lease that ``head`` shows, in the one
        commit that also records and settles the arrival; else record and claim it, start a
        run if none holds the lease, then settle it (``settled``: its outcome)."""
        check_data_uris(self.settings, request.model, request.data_uris, "data_uris")
        held = self.ledger.queue_arrival(request, head, settled, **fields)  # one commit
        if held is not None:
            if held.expires_at > self.ledger.clock():
                return Outcome("queued", request.model, detail=f"run {held.run_id} is in flight")
            return self.kick(request.model, model)  # it expired since: look at it
        recorded, claim = self.ledger.claim_arrival(request, **fields)  # one commit
        result = self._claimed(request, model, claim)[1]
        self.ledger.settle_arrival(request, settled, recorded, run_id=result.run_id)
        return result

    def _read_checked(self, event: ObjectEvent, model: ModelSettings) -> Any:
        """(frame, features, bytes, rows) of the object's generation if it passes the rules;
        None if it no longer exists. An object over :data:`SAMPLE_BYTES` is checked on a
        sample (:func:`sample_object`), and its rows estimated. :class:`ValidationError` names
        a broken rule; any other error (the store did not answer) propagates, and the arrival
        is retried."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        from components.preprocess.validation import check_arrival, check_size  # noqa: PLC0415

        generation = int(event.generation) if event.generation.isdigit() else None
        try:
            data = self._as_notified(event, generation, model)
        except NotFound:
            return None
        if data is not None:
            frame, features = check_arrival(event.uri, data, model)
            return frame, features, len(data), len(frame)
        blob = self.storage.bucket(event.bucket).get_blob(event.name, generation=generation)
        if blob is None:
            return None
        size = int(blob.size or 0)
        check_size(event.uri, size, model)
        sample = None
        try:
            if size > SAMPLE_BYTES:
                with blob.open("rb") as reader:
                    sample = sample_object(reader, event.uri, model.format, SAMPLE_BYTES)
            data = blob.download_as_bytes() if sample is None else sample[0]
        except NotFound:
            return None
        frame, features = check_arrival(event.uri, data, model)
        rows = len(frame) if sample is None else max(len(frame), round(sample[1] * len(frame)))
        return frame, features, size, rows

    def _as_notified(
        self, event: ObjectEvent, generation: int | None, model: ModelSettings
    ) -> bytes | None:
        """The object's bytes in one request, where its notification gave its size (GCS's
        JSON_API_V1 payload does) and the object is read whole (not over SAMPLE_BYTES, and
        within the size rule): the generation is pinned, so the notified size is that of
        these very bytes, and no metadata request is needed to bound the read. At most one
        byte more than notified is asked for, so a notification that understated the size
        costs no more than that. None where this does not apply, or the bytes are not as
        many as notified: the caller then asks the store for the object's metadata, as
        without a size. NotFound: this generation is gone."""
        from components.preprocess.validation import ValidationError, check_size  # noqa: PLC0415

        size = event.size
        if size is None or generation is None or not 0 < size <= SAMPLE_BYTES:
            return None
        try:
            check_size(event.uri, size, model)
        except ValidationError:
            return None  # quarantined on the store's own word, not the notification's
        blob = self.storage.bucket(event.bucket).blob(event.name, generation=generation)
        data = bytes(blob.download_as_bytes(start=0, end=size))  # bytes 0..size, inclusive
        return data if len(data) == size else None

    def _quarantine(self, request: RetrainRequest, error: Any, size: int | None = None) -> Outcome:
        """Keep the object out of every data window until released; one ERROR line says why
        (``retrain quarantine`` lists them)."""
        fields = {"rule": str(error.rule), "columns": list(error.columns), "error": str(error)}
        self.ledger.record_arrival(request, "quarantined", bytes=size, **fields)
        extra = {"rule": fields["rule"], "columns": fields["columns"]}
        return Outcome("quarantined", request.model, detail=str(error), extra=extra)

    def _drift(
        self,
        name: str,
        model: ModelSettings,
        champion: Any,
        frame: Any,
        features: tuple[str, ...],
    ) -> tuple[Literal["drift", "degradation", "schema_change"], list[str], dict[str, Any]]:
        """How the object differs from the champion's data: the alert's kind, its reasons
        (none: no alert) and details. A schema change (the object lacks features that the
        champion uses) is a reason of its own: the next run must say so and the gate
        decide (``gate.on_schema_change``)."""
        from retrain.drift import check_degradation, check_drift  # noqa: PLC0415

        metadata, estimator, reference = self._champion(name, champion)
        missing = [str(f) for f in metadata["features"] if f not in features]
        if missing:
            why = (
                f"schema change: the data lacks features {missing} that champion "
                f"v{champion.version} uses; gate.on_schema_change is {model.gate.on_schema_change}"
            )
            return "schema_change", [why], {"missing_features": missing}
        drift = check_drift(frame, metadata, model.drift)
        reasons = [drift.summary()] if drift.drifted else []
        details: dict[str, Any] = {"drift": drift}
        kind: Literal["drift", "degradation", "schema_change"] = "drift"
        if model.arrival_policy == "on_drift_or_degradation":
            degradation = check_degradation(
                frame, estimator, metadata, reference, model.drift.degradation_margin
            )
            if degradation is not None:
                details["degradation"] = degradation
                if degradation.degraded:
                    reasons.extend(degradation.reasons)
                    kind = "drift" if drift.drifted else "degradation"
        return kind, reasons, details

    def _alert(
        self,
        request: RetrainRequest,
        event: ObjectEvent,
        kind: Literal["drift", "degradation", "schema_change"],
        reasons: list[str],
        details: dict[str, Any],
        version: str,
        recorded: Doc | None,
    ) -> Outcome:
        """Claim the drift's run, then publish the alert for whoever watches drift-alerts
        (on_drift finds it claimed). Keyed by the arrival, not by this publish: a second
        check of the same arrival claims nothing new, and publishes nothing. Claimed first,
        so that a lost alert message loses no run (a crash between the two loses the
        message; the arrival's record keeps its summary)."""
        alert = DriftAlert(
            model=request.model,
            kind=kind,
            data_uris=[event.uri],
            summary="; ".join(reasons),
            details={
                name: value.to_dict() if hasattr(value, "to_dict") else value
                for name, value in details.items()
            }
            | {"champion_version": version},
        )
        alert_key = f"drift:{event.dedupe_key}"
        claim, run = self._claim(
            RetrainRequest(
                model=request.model, reason="drift", data_uris=[event.uri],
                dedupe_key=alert_key, trigger_event_id=event.event_id,
            )
        )  # fmt: skip
        message_id = None
        if claim == "new":
            message_id = self.bus.publish(
                self.settings.topics.drift_alerts, alert, model=alert.model,
                **{DEDUPE_ATTRIBUTE: alert_key},
            )  # fmt: skip
        self.ledger.settle_arrival(
            request, kind, recorded, alert_message_id=message_id, alert_key=alert_key,
            summary=alert.summary, run_id=run.run_id,
        )  # fmt: skip
        return Outcome(
            "checked", request.model, run.run_id, alert.summary, extra={"alert": message_id}
        )

    def _champion(self, name: str, champion: Any) -> tuple[dict[str, Any], Any, dict[str, float]]:
        """The champion's metadata and loaded estimator, downloaded once per artifact. The
        download's folder goes at once: nothing reads it later (in Cloud Functions, /tmp is
        memory), and no other thread can find it half-deleted."""
        key = (name, champion.artifact_uri)
        cached = self._champions.get(key)
        if cached is None:
            import json  # noqa: PLC0415

            import joblib  # noqa: PLC0415

            from retrain import blobstore  # noqa: PLC0415

            with tempfile.TemporaryDirectory(prefix=f"champion-{name}-") as tmp:
                folder = Path(tmp)
                blobstore.download_dir(champion.artifact_uri, folder)
                metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
                estimator = joblib.load(folder / MODEL_FILE)
            cached = (metadata, estimator, dict(champion.metrics))
            # One per model: the replaced champion's goes (dicts are safe across threads).
            self._champions = {k: v for k, v in self._champions.items() if k[0] != name}
            self._champions[key] = cached
        return cached

    @property
    def storage(self) -> Any:
        """The storage client that reads arriving objects (made on first use)."""
        if self._storage is None:
            from google.cloud import storage  # noqa: PLC0415

            self._storage = storage.Client()
        return self._storage


def sample_object(reader: Any, uri: str, fmt: str, limit: int) -> tuple[bytes, float] | None:
    """A readable sample of about ``limit`` bytes from the start of an object, and the ratio
    of the object's rows to the sample's (exact for Parquet, by bytes for CSV); None where the
    format cannot be sampled (a CSV compressed other than with gzip: read it whole).

    ``reader`` is a seekable binary file (``Blob.open("rb")``, which downloads only what is
    read). A CSV's head is decompressed if gzip, and cut after its last full line; a field
    that spans lines across that cut makes the sample unreadable (the object is then
    quarantined as such, and can be released)."""
    import gzip  # noqa: PLC0415
    import io  # noqa: PLC0415

    if fmt == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        parquet = pq.ParquetFile(reader)
        groups, taken = [], 0
        for index in range(parquet.num_row_groups):
            groups.append(index)
            taken += parquet.metadata.row_group(index).total_byte_size
            if taken >= limit:
                break
        table = parquet.read_row_groups(groups)
        out = io.BytesIO()
        pq.write_table(table, out)
        return out.getvalue(), parquet.metadata.num_rows / max(1, table.num_rows)
    suffix = Path(uri).suffix.lower()
    if suffix not in _CSV_SAMPLED:
        return None
    total = reader.seek(0, io.SEEK_END)
    reader.seek(0)
    gzipped = reader.read(2) == _GZIP
    if gzipped:  # gzip's trailer holds the uncompressed size (modulo 4 GiB)
        reader.seek(total - 4)
        total = int.from_bytes(reader.read(4), "little")
    reader.seek(0)
    head = (gzip.GzipFile(fileobj=reader) if gzipped else reader).read(limit)
    cut = head.rfind(b"\n") + 1
    if cut == 0 or len(head) < limit:
        return head, 1.0  # no line end (unreadable), or the whole object after all
    while total < len(head):  # over 4 GiB uncompressed: the trailer wrapped
        total += 1 << 32
    # Rows in proportion to the (uncompressed) bytes of the object that the sample holds.
    return head[:cut], total / cut


def build_service(settings: Settings, config_path: Path) -> RetrainService:
    """The service with the adapters that ``backend`` in retrain.yaml names."""
    from pipelines.launchers import launcher_for  # noqa: PLC0415
    from retrain import statedb  # noqa: PLC0415
    from retrain.bus import PubsubBus  # noqa: PLC0415
    from retrain.gatekeeper import registry_for  # noqa: PLC0415
    from retrain.ledger import FirestoreLedger  # noqa: PLC0415
    from serving.vertex_endpoint import serving_for  # noqa: PLC0415

    db = statedb.database(settings)
    ledger = FirestoreLedger(db)
    registry = registry_for(settings, db)
    return RetrainService(
        settings,
        ledger,
        launcher_for(settings, config_path, ledger),
        PubsubBus(settings.project),
        registry,
        serving_for(settings, registry),
    )
