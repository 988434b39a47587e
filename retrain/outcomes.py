"""What became of each run, and why: the ledger's record of the run joined with the
gatekeeper's decision on it. ``retrain runs`` and ``retrain versions`` list these.

A failed run says the step it failed in and the error its report carried; an abandoned
run, why the ledger gave it up; a decided run, the gate's verdict and the rules it broke.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrain.gatekeeper.registry import FirestoreRegistry
    from retrain.ledger import FirestoreLedger, RunRecord

__all__ = ["RunOutcome", "one_line", "run_outcomes"]

FAIL = ": FAIL"
IN_FLIGHT = ("gathering", "running")


def one_line(text: str, limit: int) -> str:
    """``text`` on one line (its whitespace runs made single spaces), cut to ``limit``
    characters with an ellipsis if longer."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _when(seconds: float | None) -> str | None:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else None


@dataclass(frozen=True)
class RunOutcome:
    """One run: the ledger's fields, and the gate's verdict and reasons if it decided."""

    model: str
    run_id: str
    state: str  # the ledger's: gathering, running, succeeded, failed, abandoned
    reason: str  # why it ran: data, drift, schedule, manual
    trigger: str | None
    events: int
    created_at: float
    started_at: float | None
    ended_at: float | None
    failed_step: str | None
    error: str | None
    launched_as: str | None
    verdict: str | None = None  # promoted | rejected; None: no decision on it
    version: str | None = None  # the version it registered
    reasons: list[str] = field(default_factory=list)  # the gate's rules, each pass or FAIL

    @classmethod
    def of(cls, record: RunRecord, decision: dict[str, Any] | None) -> RunOutcome:
        decision = decision or {}
        return cls(
            model=record.model,
            run_id=record.run_id,
            state=record.state,
            reason=record.reason,
            trigger=str(record.events[0]["trigger_event_id"]) if record.events else None,
            events=len(record.events),
            created_at=record.created_at,
            started_at=record.started_at,
            ended_at=record.ended_at,
            failed_step=record.failed_step,
            error=record.error,
            launched_as=record.launched_as,
            verdict=decision.get("verdict"),
            version=decision.get("new_version"),
            reasons=list(decision.get("reasons", [])),
        )

    @property
    def seconds(self) -> float | None:
        """How long it took, from its start (or creation) to its end; None while it runs."""
        if self.ended_at is None:
            return None
        return round(self.ended_at - (self.started_at or self.created_at), 1)

    @property
    def failing(self) -> list[str]:
        """The gate's rules that it broke, without the ``: FAIL`` mark."""
        return [r.removesuffix(FAIL) for r in self.reasons if r.endswith(FAIL)]

    @property
    def why(self) -> str:
        """What became of it, and why, in full ("" while it runs)."""
        if self.state in ("failed", "abandoned"):
            return self._ended_badly()
        if self.verdict is not None:
            version = f" v{self.version}" if self.version else ""
            if self.verdict == "promoted":
                return f"promoted{version}"
            return f"{self.verdict}{version}: " + "; ".join(self.failing or self.reasons)
        return "ended; the gatekeeper has not decided on its report" if self.ended_at else ""

    def _ended_badly(self) -> str:
        if self.state == "abandoned":
            return f"abandoned: {self.error or 'no reason recorded'}"
        if self.failed_step:
            return f"failed in {self.failed_step}: {self.error}"
        # It ended before the ledger kept the step: the gate's reason names it, if it decided.
        return "; ".join(self.failing) or f"failed: {self.error}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "run_id": self.run_id,
            "state": self.state,
            "reason": self.reason,
            "trigger": self.trigger,
            "events": self.events,
            "started": _when(self.started_at or self.created_at),
            "ended": _when(self.ended_at),
            "seconds": self.seconds,
            "failed_step": self.failed_step,
            "error": self.error,
            "verdict": self.verdict,
            "version": self.version,
            "reasons": self.reasons,
            "why": self.why,
            "launched_as": self.launched_as,
        }


def run_outcomes(
    ledger: FirestoreLedger, registry: FirestoreRegistry, model: str
) -> list[RunOutcome]:
    """Every run of ``model`` in the ledger, oldest first, with the decision on it."""
    decisions = {
        str(kept["decision"].get("run_id")): kept["decision"]
        for kept in registry.decisions(model)
        if isinstance(kept.get("decision"), dict)
    }
    return [RunOutcome.of(record, decisions.get(record.run_id)) for record in ledger.runs(model)]
