"""From a ``MetricsReport`` to a ``Decision``: verify, register, decide, commit, publish.

The decision on a run, the verdict of its version, the champion's move (if any) and the
end of the run in the ledger (its lease released; on a stale verdict its events requeued)
are **one commit** (:mod:`retrain.statedb`): the decision recorded is always the one the
pointer followed, and a redelivered or replayed report finds it kept and changes nothing.

A report is verified first: its run must have been launched by the ledger for that model
and still be live (not abandoned), and its candidate must lie under the run's own prefix.
Anything else is refused, kept for audit (``registry/<model>/refused``), and changes
nothing: not the champion, not the run, not its lease.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from retrain.gatekeeper.canary import judge, live_of
from retrain.gatekeeper.policy import Pointer, Verdict, decide, stale
from retrain.gatekeeper.registry import CanaryState, RegistryError, canary_of
from retrain.messages import REPORT_FILE, Decision, MetricsReport
from retrain.statedb import Change, retrying

if TYPE_CHECKING:
    from retrain.bus import Bus
    from retrain.config import Settings
    from retrain.gatekeeper.registry import FirestoreRegistry
    from retrain.ledger import FirestoreLedger, RunState

__all__ = ["Gatekeeper", "Refusal", "report_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """A report the gatekeeper did not accept, and why."""

    model: str
    run_id: str
    why: str


def report_of(settings: Settings, model: str, run_id: str) -> MetricsReport | str | None:
    """The report that run ``run_id`` kept (``report.json``, written before it published):
    the report; a string saying why it is not a valid one; or None if there is none."""
    from retrain import blobstore  # noqa: PLC0415

    uri = blobstore.join(settings.run_prefix(model, run_id), REPORT_FILE)
    data = blobstore.read_bytes(uri)
    if data is None:
        return None
    try:
        kept = json.loads(data)
        return MetricsReport.model_validate(kept["report"])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        return f"{uri} is not a valid report: {exc}"


class Gatekeeper:
    """Decides on each run's report once; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        ledger: FirestoreLedger,
        registry: FirestoreRegistry,
        bus: Bus,
        scheduled: Callable[[str, str], bool] | None = None,
    ) -> None:
        """``scheduled(model, run_id)``: whether the run is one that the model's pipeline
        schedule started (the launcher knows); such a run's report is adopted."""
        self.settings = settings
        self.ledger = ledger
        self.registry = registry
        self.bus = bus
        self.scheduled = scheduled

    def report(self, report: MetricsReport) -> Decision | Refusal:
        kept = self.registry.decision(report.model, report.run_id)
        if kept is not None:
            decision = Decision.model_validate(kept["decision"])
            if not kept.get("message_id"):  # decided, but died before it published
                self._announce(decision)
            return decision
        why = self.verify(report)
        if why is not None:
            log.warning("refused the report of run %s of %s: %s", report.run_id, report.model, why)
            self.registry.refuse(report.model, report.run_id, why,
                                 report.model_dump(mode="json"))  # fmt: skip
            return Refusal(report.model, report.run_id, why)
        version = None
        if report.status == "succeeded" and report.candidate is not None:
            artifact = self.registry.keep_artifact(
                report.model, report.run_id, report.candidate.artifact_uri
            )
            version = self.registry.register(report.model, self._version_record(report, artifact))
        decision = retrying(lambda: self._decide(report, version), f"decide on run {report.run_id}")
        self._announce(decision)
        return decision

    def verify(self, report: MetricsReport) -> str | None:
        """Why ``report`` must be refused, or None."""
        run = self.ledger.run(report.model, report.run_id)
        if run is None and self._from_schedule(report):
            self.ledger.adopt(report.model, report.run_id, report.reason, report.request_id)
            run = self.ledger.run(report.model, report.run_id)
        if run is None:
            return f"run {report.run_id} was not launched by the ledger for {report.model}"
        if run.state == "abandoned":
            return (
                f"run {report.run_id} was abandoned ({run.error}); the events it had "
                "gathered run again in a later run"
            )
        if run.state == "gathering":
            return f"run {report.run_id} never started a pipeline (it is still gathering)"
        if report.status == "succeeded" and report.candidate is not None:
            prefix = self.settings.run_prefix(report.model, report.run_id) + "/"
            uri = report.candidate.artifact_uri
            if not uri.startswith(prefix) or ".." in uri.split("/"):
                return f"the candidate {uri} lies outside the run's own prefix {prefix}"
        return None

    def _from_schedule(self, report: MetricsReport) -> bool:
        schedule = self.settings.models[report.model].schedule
        if schedule is None or schedule.via != "pipeline_schedule" or self.scheduled is None:
            return False
        return self.scheduled(report.model, report.run_id)

    def _decide(self, report: MetricsReport, version: str | None) -> Decision:
        """One attempt at the decision's commit (reads, decides, writes, commits)."""
        model, run_id = report.model, report.run_id
        run = self.registry.run_doc(model, run_id)
        if run.get("decision") is not None:  # a concurrent delivery decided first
            return Decision.model_validate(run.get("decision"))
        head = self.registry.head_doc(model)
        pointer = Pointer(head.get("champion"), int(head.get("generation", 0)))
        verdict = decide(report, self.settings.models[model].gate, pointer)
        reasons = verdict.reasons
        promote = verdict.promote and version is not None
        if version is not None and pointer.version == version:
            # Promoted by hand before the gate decided: the decision follows the pointer.
            promote = True
            reasons.append(f"v{version} is already the champion ({head.get('by')}: "
                           f"{head.get('reason')}): pass")  # fmt: skip
        elif promote and version is not None:
            veto = self.registry.veto(model, pointer.version, version)
            if veto is not None:
                promote = False
                reasons.append(veto)
        # A stale verdict compared against a champion that no longer serves: the events of
        # the run wait again, for a run against the champion that does.
        requeue = not promote and stale(report, pointer) is not None
        # A candidate that replaces a champion, with gate.canary set, serves its share
        # first: the pointer moves and records the canary in the same commit.
        canary = self.settings.models[model].gate.canary
        starts_canary = promote and canary is not None and pointer.version not in (None, version)
        if starts_canary:
            assert canary is not None  # noqa: S101 (checked above)
            reasons.append(
                f"canary: v{version} serves {canary.percent}% of the traffic until "
                f"{canary.min_labelled} of its predictions are labelled, then completes or "
                "rolls back on its live metric"
            )
        decision = Decision(
            model=model,
            run_id=run_id,
            verdict="canary" if starts_canary else "promoted" if promote else "rejected",
            reasons=reasons,
            new_version=version,
            previous_champion=pointer.version,
        )
        kept = {"decision": decision.model_dump(mode="json"), "time": decision.time.isoformat(),
                "message_id": None, "requeued": requeue}  # fmt: skip
        change = Change()
        share = canary.percent if starts_canary and canary is not None else None
        self.registry.decide(change, model, run, head, kept, version, promote,
                             by="gatekeeper", reason=f"run {run_id}", canary=share)  # fmt: skip
        state: RunState = "succeeded" if report.status == "succeeded" else "failed"
        self.ledger.close(change, model, run_id, state, report.error, requeue=requeue,
                          failed_step=report.failed_step)  # fmt: skip
        self.ledger.db.commit(change)
        return decision

    def _announce(self, decision: Decision) -> None:
        """Move the Vertex alias (if any) after a promotion, publish the decision, and keep
        its message id. A crash in between is finished by the next delivery."""
        if decision.verdict in ("promoted", "canary"):
            self.registry.project(decision.model)
        message_id = self.bus.publish(
            self.settings.topics.model_decisions, decision,
            model=decision.model, verdict=decision.verdict,
        )  # fmt: skip
        self.registry.mark_published(decision.model, decision.run_id, message_id)

    # -- the canary stage ------------------------------------------------------------

    def settle_canary(self, model: str, live: dict[str, dict[str, float]]) -> Decision | None:
        """Complete or roll back ``model``'s canary on ``live`` (``{version: {<metric>:
        value, "labelled": n, "served": n}}``: the canary's and the previous champion's
        numbers on the same window; :func:`~retrain.gatekeeper.canary.judge`).

        The Decision (stage ``canary``, verdict ``promoted`` or ``rolled_back``, run id =
        the canary version's run) is kept in that run's document (``canary_decision``) in
        the same commit that ends the canary in the pointer (see
        :meth:`FirestoreRegistry.settle_canary`), compare-and-swap against the pointer as
        read: a manual promote or rollback that commits first wins, and this call then
        changes nothing and returns None. Then the alias follows the pointer, the
        Decision goes to ``model-decisions``, and its message id is kept.

        Every call first finishes a canary Decision that was kept but not published (a
        crash between the commit and the publish), so call it on every monitor tick of a
        model with ``gate.canary``, with whatever ``live`` there is (``{}`` will do).
        Returns the Decision made or finished here, or None: nothing to decide (no
        canary, not judged yet, the pointer moved, or ``gate.canary`` no longer set: an
        operator ends such a canary with ``retrain promote`` or ``rollback``)."""
        finished = self._finish_canaries(model)
        spec = self.settings.models[model].gate.canary
        state = self.registry.canary(model)
        if spec is None or state is None:
            return finished
        gate = self.settings.models[model].gate
        verdict = judge(state, spec, gate.primary_metric, live)
        if verdict is None:
            return finished
        metric = spec.metric or gate.primary_metric
        decision = retrying(
            lambda: self._settle(model, state, verdict, live_of(live, state, metric)),
            f"settle the canary v{state.version} of {model}",
        )
        if decision is None:
            log.info("the canary v%s of %s ended meanwhile; nothing settled", state.version, model)
            return finished
        self._announce_canary(decision)
        return decision

    def _settle(
        self, model: str, state: CanaryState, verdict: Verdict, live: dict[str, dict[str, float]]
    ) -> Decision | None:
        """One attempt at the canary's commit; None if the canary read is no longer the
        pointer's (moved by hand, or settled by a concurrent call)."""
        head = self.registry.head_doc(model)
        if canary_of(self.registry.where(model), head.data) != state:
            return None
        record = self.registry.version(model, state.version)
        if record is None or not record.run_id:
            raise RegistryError(
                f"{self.registry.where(model, 'versions', state.version)}: the canary's "
                "version has no run to keep its decision in"
            )
        run = self.registry.run_doc(model, record.run_id)
        complete = verdict.promote
        reasons = verdict.reasons
        reasons.append(
            f"completed: v{state.version} serves all traffic" if complete else
            f"rolled back: v{state.previous} serves all traffic again, v{state.version} none"
        )  # fmt: skip
        decision = Decision(
            model=model,
            run_id=record.run_id,
            verdict="promoted" if complete else "rolled_back",
            reasons=reasons,
            new_version=state.version,
            previous_champion=state.previous,
            stage="canary",
            live=live,
        )
        kept = {"decision": decision.model_dump(mode="json"), "time": decision.time.isoformat(),
                "message_id": None}  # fmt: skip
        change = Change()
        why = f"canary v{state.version} worse on its live metric"
        self.registry.settle_canary(change, model, head, state, run, kept, complete, why)
        self.registry.db.commit(change)
        return decision

    def _finish_canaries(self, model: str) -> Decision | None:
        """Publish the canary Decisions kept but not published; the last one, or None."""
        finished = None
        for run_id in self.registry.unpublished_canaries(model):
            kept = self.registry.canary_decision(model, run_id)
            if kept is None:
                raise RegistryError(
                    f"{self.registry.where(model)} names run {run_id} in canary_unpublished, "
                    f"but {self.registry.where(model, 'runs', run_id)} keeps no canary decision"
                )
            finished = Decision.model_validate(kept["decision"])
            self._announce_canary(finished)
        return finished

    def _announce_canary(self, decision: Decision) -> None:
        """As :meth:`_announce`, for a canary Decision."""
        self.registry.project(decision.model)
        message_id = self.bus.publish(
            self.settings.topics.model_decisions, decision,
            model=decision.model, verdict=decision.verdict, stage=decision.stage,
        )  # fmt: skip
        self.registry.mark_canary_published(decision.model, decision.run_id, message_id)

    @staticmethod
    def _version_record(report: MetricsReport, artifact_uri: str) -> dict[str, Any]:
        assert report.candidate is not None  # noqa: S101 (a succeeded report carries it)
        return {
            "model": report.model,
            "artifact_uri": artifact_uri,
            "metrics": report.candidate.metrics,
            "run_id": report.run_id,
            "request_id": report.request_id,
            "reason": report.reason,
            "compared_with": report.champion.model_dump(mode="json") if report.champion else None,
            "lineage": {
                "candidate_uri": report.candidate.artifact_uri,
                "train_data_uris": report.train_data_uris,
                "train_rows": report.train_rows,
                "window_rows": report.window_rows,
                "fit_rows": report.fit_rows,
                "eval_data_uris": report.eval_data_uris,
            },
            "registered_at": datetime.now(UTC).isoformat(),
        }
