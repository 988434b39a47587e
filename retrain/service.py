"""The core behind the Cloud Functions: events in, at most one run per model out.

Each handler gets an already-decoded event, decides, and returns an :class:`Outcome`
that the function logs as one line. It never waits for a pipeline: a launch starts a
worker and returns. A malformed event raises :class:`~retrain.events.EventError` (the
function acks it); anything else propagates, so Pub/Sub retries and then dead-letters.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from retrain.config import ModelSettings, Settings
from retrain.events import DEDUPE_ATTRIBUTE, EventError, ObjectEvent, PubsubMessage, json_object
from retrain.ledger import new_run_id
from retrain.messages import (
    Decision,
    DriftAlert,
    MetricsReport,
    RetrainRequest,
    ScheduleMessage,
)

if TYPE_CHECKING:
    from pipelines.launchers import PipelineLauncher
    from retrain.bus import Bus
    from retrain.ledger import GcsLedger
    from serving.registry import GcsRegistryWriter, Serving

__all__ = ["GATHER_SECONDS", "Outcome", "RetrainService", "build_service", "gathering_lease"]

Action = Literal["launched", "queued", "duplicate", "ignored", "checked", "decided"]


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
        ledger: GcsLedger,
        launcher: PipelineLauncher,
        bus: Bus,
        registry: GcsRegistryWriter,
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
        self._champions: dict[tuple[str, str], tuple[dict[str, Any], Path, dict[str, float]]] = {}

    # -- the one path to a run -----------------------------------------------------

    def request(self, request: RetrainRequest) -> Outcome:
        """Claim the request once; launch a run if the model has none, else leave it queued."""
        model = self._model(request.model)
        claim = self.ledger.claim(request)
        if claim == "done":
            return Outcome("duplicate", request.model, detail=f"{request.dedupe_key} already run")
        outcome = self.kick(request.model, model)
        if claim == "pending" and outcome.action == "queued":
            return Outcome("duplicate", request.model, detail=f"{request.dedupe_key} queued")
        return outcome

    def kick(self, name: str, model: ModelSettings | None = None) -> Outcome:
        """Start a run for ``name`` if none holds its lease; the run gathers what is pending."""
        model = model or self._model(name)
        run_id = new_run_id(name)
        # Held only for the gathering at first: a launch that dies in between frees the model
        # soon. The launcher (or the local worker) extends it to lease_seconds once it runs.
        lease = self.ledger.try_acquire(name, run_id, ttl=gathering_lease(model))
        if not lease.acquired:
            return Outcome("queued", name, detail=f"run {lease.holder or '?'} is in flight")
        try:
            self.launcher.submit(name, run_id)
        except Exception as exc:
            # The lease must not outlive a launch that never happened, and the events the
            # run gathered wait again: the redelivery that this error causes launches them.
            self.ledger.abandon(name, run_id, f"launch failed: {type(exc).__name__}: {exc}")
            raise
        return Outcome("launched", name, run_id=run_id)

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
        """Kick every model whose events wait, or whose lease expired: a run that died (before
        it launched, or without a report) is taken over and its events run again; a run in
        flight keeps its lease. One model's failure does not stop the others."""
        outcomes: dict[str, str] = {}
        launched: dict[str, str | None] = {}
        for name in self.settings.models:
            lease = self.ledger.lease(name)
            expired = lease is not None and lease.expires_at <= self.ledger.clock()
            if not (expired or self.ledger.has_pending(name)):
                continue
            try:
                outcome = self.kick(name)
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
        """A run ended: decide on its candidate, then release its lease; one trailing run
        covers whatever arrived meanwhile; then the endpoint (if any) serves a promotion.
        The deploy comes last: it may wait minutes, and the next run must not wait for it."""
        try:
            decision = self.gatekeep(report)
        finally:  # the run is over either way: its lease must not wait for the TTL
            self.ledger.finish(
                report.model, report.run_id,
                "succeeded" if report.status == "succeeded" else "failed", report.error,
            )  # fmt: skip
        extra = {"verdict": decision.verdict, "version": decision.new_version}
        detail = "; ".join(decision.reasons)
        if self.ledger.has_pending(report.model):
            trailing = self.kick(report.model)
            detail = f"trailing run {trailing.run_id or '(queued)'}; {detail}"
        self._serve(decision)  # a deploy that failed on an earlier delivery is tried again
        return Outcome("decided", report.model, report.run_id, detail, extra)

    def gatekeep(self, report: MetricsReport) -> Decision:
        """Register the candidate, apply the gate, promote by compare-and-swap, publish the
        Decision. The same report twice gives one version and one decision."""
        from retrain.gate import decide  # noqa: PLC0415

        registry = self.registry
        kept = registry.decision(report.model, report.run_id)
        if kept is not None:
            decision = Decision.model_validate(kept["decision"])
            if not kept.get("message_id"):  # decided, but died before it finished: finish
                if decision.new_version:
                    registry.record_verdict(
                        report.model, decision.new_version, verdict=decision.verdict,
                        reasons=decision.reasons, decided_at=datetime.now(UTC).isoformat(),
                    )  # fmt: skip
                self._publish_decision(report.model, report.run_id, decision)
            return decision
        model = self._model(report.model)
        version = None
        if report.status == "succeeded" and report.candidate is not None:
            version, _ = registry.register(report.model, self._version_record(report))
        champion = registry.champion(report.model)
        current = champion.version if champion else None
        if version is not None and current == version:
            # An earlier delivery promoted this version and died before it recorded the
            # decision: decide against the champion it replaced, and do not move anything.
            pointer = registry.champion_pointer(report.model)
            current = ((pointer[0].get("previous") or [None])[0]) if pointer else None
            verdict = decide(report, model.gate, current)
            return self._finish_decision(report, version, current, True, verdict.reasons)
        verdict = decide(report, model.gate, current)
        reasons = verdict.reasons
        promoted = False
        if verdict.promote and version is not None:
            promoted = registry.promote(
                report.model, version, current, by="gatekeeper", reason=f"run {report.run_id}"
            )
            if not promoted:
                now = registry.champion(report.model)
                moved = now.version if now else None
                reasons.append(
                    f"stale: the champion moved to v{moved} while deciding: FAIL"
                    if moved != current
                    else f"stale: the registry's champion alias is not on v{current} (moved by "
                    "hand?); adopt it with `retrain promote` or move it back: FAIL"
                )
        return self._finish_decision(report, version, current, promoted, reasons)

    def _serve(self, decision: Decision) -> None:
        """Deploy a promoted version that is still the champion (a redelivered old decision
        must not undo a later promotion or rollback)."""
        if self.serving is None or decision.verdict != "promoted" or not decision.new_version:
            return
        champion = self.registry.champion(decision.model)
        if champion is not None and champion.version == decision.new_version:
            self.serving.deploy(decision.model, decision.new_version)

    def _finish_decision(
        self, report: MetricsReport, version: str | None, previous: str | None,
        promoted: bool, reasons: list[str],
    ) -> Decision:  # fmt: skip
        """Keep the decision once (the first keeper wins), then the verdict, then publish."""
        registry = self.registry
        decision = Decision(
            model=report.model,
            run_id=report.run_id,
            verdict="promoted" if promoted else "rejected",
            reasons=reasons,
            new_version=version,
            previous_champion=previous,
        )
        kept = {"decision": decision.model_dump(mode="json"), "time": decision.time.isoformat()}
        if not registry.record_decision(report.model, report.run_id, kept):
            # A concurrent delivery of the same report decided first: its decision stands.
            first = registry.decision(report.model, report.run_id) or kept
            return Decision.model_validate(first["decision"])
        if version is not None:
            registry.record_verdict(
                report.model, version, verdict=decision.verdict, reasons=reasons,
                decided_at=datetime.now(UTC).isoformat(),
            )  # fmt: skip
        self._publish_decision(report.model, report.run_id, decision)
        return decision

    def _publish_decision(self, model: str, run_id: str, decision: Decision) -> None:
        message_id = self.bus.publish(
            self.settings.topics.model_decisions, decision, model=model, verdict=decision.verdict
        )
        self.registry.mark_published(model, run_id, message_id)

    @staticmethod
    def _version_record(report: MetricsReport) -> dict[str, Any]:
        assert report.candidate is not None  # noqa: S101 (a succeeded report carries it)
        return {
            "model": report.model,
            "artifact_uri": report.candidate.artifact_uri,
            "metrics": report.candidate.metrics,
            "run_id": report.run_id,
            "request_id": report.request_id,
            "reason": report.reason,
            "compared_with": report.champion.model_dump(mode="json") if report.champion else None,
            "lineage": {
                "train_data_uris": report.train_data_uris,
                "train_rows": report.train_rows,
                "eval_data_uris": report.eval_data_uris,
            },
            "registered_at": datetime.now(UTC).isoformat(),
            "verdict": None,
            "reasons": [],
        }

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
        drift = check_drift(frame, metadata, model.drift)
        reasons = [drift.summary()] if drift.drifted else []
        details: dict[str, Any] = {"drift": drift.to_dict()}
        kind: Literal["drift", "degradation"] = "drift"
        if model.arrival_policy == "on_drift_or_degradation":
            degradation = check_degradation(
                frame, model_dir, metadata, reference, model.drift.degradation_margin
            )
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
        """The champion's metadata and model folder, downloaded once per version."""
        key = (name, champion.version)
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
    from retrain.bus import PubsubBus  # noqa: PLC0415
    from retrain.ledger import GcsLedger  # noqa: PLC0415
    from serving.registry import registry_writer, serving_for  # noqa: PLC0415

    ledger = GcsLedger(settings.buckets.artifacts)
    registry = registry_writer(settings)
    return RetrainService(
        settings,
        ledger,
        launcher_for(settings, config_path, ledger),
        PubsubBus(settings.project),
        registry,
        serving_for(settings, registry),
    )
