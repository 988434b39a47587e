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

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

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
from retrain.ledger import Acquired, Lease, new_run_id
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
    from serving.vertex_endpoint import Serving

__all__ = [
    "GATHER_SECONDS",
    "Outcome",
    "RetrainService",
    "build_service",
    "gathering_lease",
]

Action = Literal["launched", "queued", "duplicate", "ignored", "checked", "decided", "refused"]


# How long a run may take, past the coalescing window, to gather its events and launch.
GATHER_SECONDS = 300.0


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
    ) -> None:
        """``serving`` deploys a promoted version (Vertex AI endpoints); None where the
        prediction server follows the decisions topic by itself (the local stack)."""
        self.settings = settings
        self.ledger = ledger
        self.launcher = launcher
        self.bus = bus
        self.registry = registry
        self.serving = serving
        self.gatekeeper = Gatekeeper(settings, ledger, registry, bus, launcher.scheduled)
        self._champions: dict[tuple[str, str], tuple[dict[str, Any], Path, dict[str, float]]] = {}

    # -- the one path to a run -----------------------------------------------------

    def request(self, request: RetrainRequest) -> Outcome:
        """Claim the request once; launch a run if the model has none, else leave it queued."""
        model = self._model(request.model)
        check_data_uris(self.settings, request.model, request.data_uris, "data_uris")
        claim = self.ledger.claim(request)
        if claim == "done":
            return Outcome("duplicate", request.model, detail=f"{request.dedupe_key} already run")
        outcome = self.kick(request.model, model)
        if claim == "pending" and outcome.action == "queued":
            return Outcome("duplicate", request.model, detail=f"{request.dedupe_key} queued")
        return outcome

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
        model = self.settings.models[name]
        request = RetrainRequest(
            model=name,
            reason="data",
            data_uris=[event.uri],
            dedupe_key=event.dedupe_key,
            trigger_event_id=event.event_id,
        )
        if model.arrival_policy == "every_arrival":
            return self.request(request)
        return self._check_arrival(request, model, event)

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
            if self.ledger.lease(name) is None and not self.ledger.has_pending(name):
                continue
            try:
                outcome = self.kick(name, look=True)
            except Exception as exc:  # noqa: BLE001 (in the log line; the next sweep retries)
                outcomes[name] = f"failed: {type(exc).__name__}: {exc}"
                continue
            outcomes[name] = f"{outcome.action} {outcome.run_id or outcome.detail}"
            if outcome.action == "launched":
                launched[name] = outcome.run_id
        detail = "; ".join(f"{name}: {what}" for name, what in outcomes.items())
        return Outcome(
            "checked", detail=f"sweep: {detail or 'nothing waits'}", extra={"launched": launched}
        )

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
        """Deploy a promoted version that is still the champion (a redelivered old decision
        must not undo a later promotion or rollback)."""
        if self.serving is None or decision.verdict != "promoted" or not decision.new_version:
            return
        champion = self.registry.champion(decision.model)
        if champion is not None and champion.version == decision.new_version:
            self.serving.deploy(decision.model, decision.new_version)

    # -- arrival policies that look at the data --------------------------------------

    def _check_arrival(
        self, request: RetrainRequest, model: ModelSettings, event: ObjectEvent
    ) -> Outcome:
        if not self.ledger.record_arrival(request):
            seen = self.ledger.arrival(request.model, request.dedupe_key) or {}
            if seen.get("outcome") is not None:
                return Outcome("duplicate", request.model, detail=f"{event.dedupe_key} checked")
            # An earlier delivery died before its check finished: check again.
        champion = self.registry.champion(request.model)
        if champion is None:  # nothing to compare with: the first model needs this data
            outcome = self.request(request)
            self.ledger.settle_arrival(request, "first_model", run_id=outcome.run_id)
            return outcome
        from components.dataio import DataReadError, read_table  # noqa: PLC0415 (pandas)
        from retrain.drift import check_degradation, check_drift  # noqa: PLC0415

        metadata, model_dir, reference = self._champion(request.model, champion)
        try:
            frame = read_table(event.uri, model.format)
        except DataReadError as exc:
            self.ledger.settle_arrival(request, "unreadable", summary=str(exc))
            raise EventError(f"{event.uri}: cannot check it for drift: {exc.reason}") from exc
        try:
            drift = check_drift(frame, metadata, model.drift)
            degradation = (
                check_degradation(
                    frame, model_dir, metadata, reference, model.drift.degradation_margin
                )
                if model.arrival_policy == "on_drift_or_degradation"
                else None
            )
        except ValueError as exc:  # the data itself: retrying it would fail the same way
            self.ledger.settle_arrival(request, "unreadable", summary=str(exc))
            raise EventError(f"{event.uri}: cannot check it for drift: {exc}") from exc
        reasons = [drift.summary()] if drift.drifted else []
        details: dict[str, Any] = {"drift": drift.to_dict()}
        kind: Literal["drift", "degradation"] = "drift"
        if degradation is not None:
            details["degradation"] = degradation.to_dict()
            if degradation.degraded:
                reasons.extend(degradation.reasons)
                kind = "drift" if drift.drifted else "degradation"
        if not reasons:
            self.ledger.settle_arrival(request, "no_drift", summary=drift.summary())
            return Outcome("checked", request.model, detail=f"no drift: {drift.summary()}")
        alert = DriftAlert(
            model=request.model,
            kind=kind,
            data_uris=[event.uri],
            summary="; ".join(reasons),
            details=details | {"champion_version": champion.version},
        )
        # Keyed by the arrival, not by this publish: if this delivery dies before it settles
        # and the arrival is checked again, the second alert is a duplicate, not a new run.
        alert_key = f"drift:{event.dedupe_key}"
        message_id = self.bus.publish(
            self.settings.topics.drift_alerts, alert, model=alert.model,
            **{DEDUPE_ATTRIBUTE: alert_key},
        )  # fmt: skip
        self.ledger.settle_arrival(
            request, kind, alert_message_id=message_id, alert_key=alert_key,
            summary=alert.summary,
        )  # fmt: skip
        return Outcome("checked", request.model, detail=alert.summary, extra={"alert": message_id})

    def _champion(self, name: str, champion: Any) -> tuple[dict[str, Any], Path, dict[str, float]]:
        """The champion's metadata and model folder, downloaded once per artifact."""
        key = (name, champion.artifact_uri)
        if key not in self._champions:
            import json  # noqa: PLC0415

            from retrain import blobstore  # noqa: PLC0415

            folder = Path(tempfile.mkdtemp(prefix=f"champion-{name}-{champion.version}-"))
            blobstore.download_dir(champion.artifact_uri, folder)
            metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
            # One folder per model: the replaced champion's goes (in Cloud Functions, /tmp
            # is memory).
            for stale in [k for k in self._champions if k[0] == name]:
                shutil.rmtree(self._champions.pop(stale)[1], ignore_errors=True)
            self._champions[key] = (metadata, folder, dict(champion.metrics))
        return self._champions[key]


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
