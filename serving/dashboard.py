"""The status dashboard at ``/``: models, champions, versions, decisions (the gate's and
the canary's), runs, the quarantined data objects, and what the monitor saw of the served
traffic (serving drift and the live metric per version, per window), and the canary.

``status()`` gathers everything from the registry and the ledger as JSON
(``/api/status``); the page renders it and refreshes itself every few seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain.monitoring import history

if TYPE_CHECKING:
    from retrain.config import ModelSettings, Settings
    from retrain.gatekeeper.registry import FirestoreRegistry
    from retrain.ledger import FirestoreLedger

__all__ = ["PAGE", "status"]

RECENT = 10
WINDOWS = 24  # the monitor's windows shown


def _canary(registry: FirestoreRegistry, name: str, spec: ModelSettings,
            windows: list[dict[str, Any]]) -> dict[str, Any] | None:  # fmt: skip
    """The champion's canary, if it is one, with its labelled predictions so far (from
    the monitor's last window that had figures for it)."""
    state = registry.canary(name)
    if state is None:
        return None
    live: dict[str, Any] = {}
    for window in reversed(windows):
        figures = window.get("live") or {}
        if state.version in figures:
            live = {v: figures[v] for v in (state.version, state.previous) if v in figures}
            break
    policy = spec.gate.canary
    return {
        "version": state.version,
        "previous": state.previous,
        "percent": state.percent,
        "started": _when(state.started_at),
        "min_labelled": policy.min_labelled if policy else None,
        "live": live,
    }


def _window(window: dict[str, Any]) -> dict[str, Any]:
    return {
        "end": _when(window.get("end")),
        "served": window.get("served"),
        "drift": window.get("drift") or {},
        "drifted": window.get("drifted"),
        "note": window.get("note"),
        "live": window.get("live") or {},
        "alerts": {k: v for k, v in (window.get("alerts") or {}).items() if v},
    }


def _when(seconds: float | None) -> str | None:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else None


def status(
    settings: Settings, registry: FirestoreRegistry, ledger: FirestoreLedger
) -> dict[str, Any]:
    models = []
    for name, spec in settings.models.items():
        primary = spec.gate.primary_metric
        pointer = registry.champion_record(name)
        champion = pointer.get("champion") if pointer else None
        versions = [
            {
                "version": r["version"],
                "verdict": r.get("verdict"),
                "primary": r.get("metrics", {}).get(primary),
                "metrics": r.get("metrics", {}),
                "reasons": r.get("reasons", []),
                "run_id": r.get("run_id"),
                "reason": r.get("reason"),
                "registered_at": r.get("registered_at"),
                "champion": r["version"] == champion,
            }
            for r in registry.records(name)
        ]
        kept = registry.decisions(name) + registry.canary_decisions(name)
        decisions = sorted((d["decision"] for d in kept), key=lambda d: str(d.get("time", "")))
        decisions = decisions[-RECENT:]
        windows = history(registry.db, name, WINDOWS)
        runs = [
            {
                "run_id": r.run_id,
                "reason": r.reason,
                "trigger": r.events[0]["trigger_event_id"] if r.events else None,
                "events": len(r.events),
                "state": r.state,
                "started": _when(r.started_at or r.created_at),
                "seconds": round(r.ended_at - (r.started_at or r.created_at), 1)
                if r.ended_at
                else None,
            }
            for r in ledger.runs(name)
        ][-RECENT:]
        quarantined = [
            {
                "object": q.get("object"),
                "rule": q.get("rule"),
                "columns": q.get("columns") or [],
                "error": q.get("error"),
                "at": _when(q.get("received_at")),
            }
            for q in ledger.quarantined(name)
        ]
        models.append(
            {
                "name": name,
                "primary_metric": primary,
                "champion": champion,
                "champion_set_by": pointer.get("by") if pointer else None,
                "versions": versions,
                "decisions": list(reversed(decisions)),
                "runs": list(reversed(runs)),
                "quarantined": list(reversed(quarantined)),
                "canary": _canary(registry, name, spec, windows),
                "monitor": [_window(w) for w in windows],
            }
        )
    return {"project": settings.project, "generated_at": _when(datetime.now(UTC).timestamp()),
            "models": models}  # fmt: skip


# The page itself: static HTML and a little JavaScript, which fetches /api/status.
PAGE = (Path(__file__).with_name("dashboard.html")).read_text(encoding="utf-8")
