"""A pipeline run's identity and what it leaves behind: its report, or the error it failed with.

Kept apart from the evaluation code so that every step and the exit handler can use it
without importing scikit-learn (each KFP task is a fresh process; imports are its cost).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from google.api_core.exceptions import PreconditionFailed

from retrain import blobstore
from retrain.bus import Bus
from retrain.config import Settings
from retrain.messages import REPORT_FILE, MetricsReport

__all__ = [
    "RunContext",
    "failure_report",
    "publish_report",
    "read_failure",
    "read_report",
    "record_failure",
    "report_uri",
    "run_prefix",
]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
PUBLISHED_FILE = "published.json"
Reason = Literal["data", "drift", "schedule", "manual"]
REASONS: tuple[Reason, ...] = get_args(Reason)


@dataclass(frozen=True)
class RunContext:
    """Which run this is, and for which request."""

    model: str
    run_id: str
    request_id: str
    reason: Reason

    @classmethod
    def parse(
        cls, model: str, run_id: str, request_id: str, reason: str, job_name: str = ""
    ) -> RunContext:
        """From pipeline parameters (plain strings); an unknown reason is an error.

        A scheduled pipeline job (``retrain schedule sync``) has no run id of ours: an
        empty ``run_id`` becomes the pipeline job's own name, and an empty ``request_id``
        the run id.
        """
        if not run_id:
            run_id = _SAFE.sub("-", job_name).strip("-.")
            if not run_id:
                raise ValueError("run_id is empty and the pipeline job has no name to use")
        for known in REASONS:
            if reason == known:
                return cls(model, run_id, request_id or run_id, known)
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")


def run_prefix(settings: Settings, run: RunContext) -> str:
    """Where a run keeps what outlives it: the candidate model, eval rows, its error."""
    return settings.run_prefix(run.model, run.run_id)


def publish_report(
    settings: Settings, run: RunContext, report: MetricsReport, bus: Bus
) -> tuple[MetricsReport, str]:
    """Keep ``report`` as the run's ``report.json``, then publish it; the report published
    (the one kept first) and its message id.

    Kept first, and only once: if the run kept a report already (an earlier attempt, or
    the evaluate step before the exit handler runs), that one is published again, so
    every report of a run says the same. A run that published has always kept its report,
    which is what the sweep reads if the message is lost.
    """
    uri = report_uri(settings, run)
    record = {"report": report.model_dump(mode="json")}
    try:
        blobstore.write_bytes(uri, json.dumps(record, indent=2).encode(), if_generation_match=0)
    except PreconditionFailed:
        kept = json.loads(blobstore.read_bytes(uri) or b"{}")
        report = MetricsReport.model_validate(kept["report"])
    message_id = bus.publish(settings.topics.model_metrics, report, model=run.model)
    blobstore.write_bytes(
        blobstore.join(run_prefix(settings, run), PUBLISHED_FILE),
        json.dumps({"message_id": message_id}).encode(),
    )
    return report, message_id


def report_uri(settings: Settings, run: RunContext) -> str:
    """The run's report: the audit trail of the run, and what the sweep decides from if
    the published message never reached the gatekeeper."""
    return blobstore.join(run_prefix(settings, run), REPORT_FILE)


def read_report(settings: Settings, run: RunContext) -> tuple[dict[str, Any], str | None] | None:
    """The run's kept report (as JSON) and the message id it was last published with."""
    data = blobstore.read_bytes(report_uri(settings, run))
    if data is None:
        return None
    published = blobstore.read_bytes(blobstore.join(run_prefix(settings, run), PUBLISHED_FILE))
    message_id = json.loads(published).get("message_id") if published else None
    return json.loads(data)["report"], message_id


def record_failure(settings: Settings, run: RunContext, step: str, error: BaseException) -> None:
    """Keep a step's error where the exit handler finds it (the first failure wins)."""
    record = {"step": step, "error": f"{type(error).__name__}: {error}"}
    with contextlib.suppress(PreconditionFailed):  # an earlier step's error is kept
        blobstore.write_bytes(
            blobstore.join(run_prefix(settings, run), "error.json"),
            json.dumps(record).encode(),
            if_generation_match=0,
        )


def read_failure(settings: Settings, run: RunContext) -> dict[str, str] | None:
    data = blobstore.read_bytes(blobstore.join(run_prefix(settings, run), "error.json"))
    if data is None:
        return None
    value = json.loads(data)
    return {"step": str(value.get("step", "")), "error": str(value.get("error", ""))}


def failure_report(
    settings: Settings, run: RunContext, state: str, fallback_error: str, bus: Bus
) -> tuple[MetricsReport, str] | None:
    """Publish ``status: failed`` unless the run succeeded; None if there was nothing to do.
    If the run kept a report already, that one is published again instead."""
    if state == "SUCCEEDED":
        return None
    failure = read_failure(settings, run)
    report = MetricsReport(
        model=run.model,
        run_id=run.run_id,
        request_id=run.request_id,
        reason=run.reason,
        status="failed",
        error=failure["error"] if failure else (fallback_error or f"the run ended {state}"),
        failed_step=failure["step"] if failure else None,
    )
    return publish_report(settings, run, report, bus)
