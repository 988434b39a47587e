"""What every ``PipelineLauncher`` does with the ledger, and the port itself.

A launch goes: the run (holding the model's lease) waits out the coalescing window and
collects the waiting events (:func:`gather_or_end`); extends its lease from the
gathering's few minutes to ``lease_seconds`` (:func:`hold_for_run`), so that no other
run takes the model while the pipeline runs; submits the pipeline, named after the run
(:func:`launch_name`), so that a retried submit of the same run is recognised; and keeps
the job's name in the run's record (:func:`record_launch`).

The sweep asks each launcher for the state of a lease holder's pipeline
(:meth:`PipelineLauncher.state`): a run whose pipeline still runs keeps its lease, however
long it takes; one whose pipeline ended without a report is taken over.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal, Protocol

from retrain.data_objects import RunInputs, gather
from retrain.ledger import LostLease
from retrain.messages import RetrainRequest

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.ledger import FirestoreLedger, RunRecord

__all__ = [
    "JobState",
    "PipelineLauncher",
    "gather_or_end",
    "hold_for_run",
    "launch_name",
    "pipeline_parameters",
    "record_launch",
]

log = logging.getLogger(__name__)

_EVENT_FIELDS = ("dedupe_key", "trigger_event_id", "reason", "data_uris", "time")

# running: the pipeline (job, or local worker) is alive; ended: it finished, failed, was
# cancelled or died; absent: none was ever started for the run (as far as one can see).
JobState = Literal["running", "ended", "absent"]


class PipelineLauncher(Protocol):
    def submit(self, model: str, run_id: str) -> None:
        """Start run ``run_id``, which holds the model's lease, and return at once; the run
        waits out the coalescing window, takes the waiting events from the ledger, and runs."""
        ...

    def state(self, model: str, run: RunRecord) -> JobState:
        """Whether ``run``'s pipeline runs, ended, or was never started."""
        ...

    def scheduled(self, model: str, run_id: str) -> bool:
        """Whether ``run_id`` is a pipeline run that ``model``'s own pipeline schedule
        started (``schedule.via: pipeline_schedule``, made by ``retrain schedule sync``):
        the gatekeeper then adopts its report, though the ledger did not launch it."""
        ...


def launch_name(run_id: str) -> str:
    """The Vertex AI job id (or KFP run name) of run ``run_id``.

    One run, one name: a retried submit of the run is refused by Vertex AI (409), and the
    sweep finds the job of any run by its id. It matches Vertex AI's job id pattern
    ``[a-z][-a-z0-9]{0,127}``: run ids are ``<model>-<date>-<time>-<hex>``, and model
    names ``[a-z][a-z0-9-]{0,62}``.
    """
    return f"retrain-{run_id}"[:128]


def pipeline_parameters(
    model: str, run_id: str, config_text: str, inputs: RunInputs | None = None
) -> dict[str, Any]:
    """The parameters of ``pipelines/retrain_pipeline.py``.

    Without ``inputs`` (a scheduled job), ``run_id`` and ``data_uris`` are empty: the steps
    then take the pipeline job's own name as run id, and the model's current data window.
    """
    return {
        "model": model,
        "data_uris": list(inputs.data_uris) if inputs else [],
        "request_id": inputs.request_id if inputs else "",
        "reason": inputs.reason if inputs else "schedule",
        "run_id": run_id,
        "config_yaml": config_text,
    }


def gather_or_end(
    settings: Settings, ledger: FirestoreLedger, model: str, run_id: str
) -> RunInputs | None:
    """:func:`~retrain.data_objects.gather`; None if there is nothing to launch: nothing
    waits (the run ends as abandoned), or the run lost its lease (it is over already).

    A retried submit of a run that gathered already gets what it gathered, so that it
    reaches the launcher's "already launched" path instead of gathering nothing."""
    earlier = ledger.run(model, run_id)
    if earlier is not None and earlier.started_at is not None and earlier.events:
        requests = [
            RetrainRequest(model=model, **{k: e[k] for k in _EVENT_FIELDS}) for e in earlier.events
        ]
        return RunInputs(list(earlier.data_uris), sorted(requests, key=lambda r: r.time))
    since = earlier.created_at if earlier is not None else None
    try:
        return gather(settings, ledger, model, run_id, since=since)
    except LostLease as exc:
        log.warning("run %s of %s: %s", run_id, model, exc)
        return None
    except LookupError as exc:
        log.info("run %s of %s: %s", run_id, model, exc)
        ledger.finish(model, run_id, "abandoned", str(exc))
        return None


def hold_for_run(ledger: FirestoreLedger, model: str, run_id: str, ttl: float) -> bool:
    """Before submitting, extend the model's lease from the gathering's few minutes to the
    run's ``ttl``: a job must never run on the short lease. False if the lease is lost
    (taken over meanwhile): the gathered events go back to the queue, nothing is submitted."""
    renewal = ledger.renew(model, run_id, ttl)
    if renewal == "held":
        return True
    log.warning("run %s of %s: lost the model's lease before submitting", run_id, model)
    if renewal == "lost":  # ("released": whoever ended the run dealt with its events)
        ledger.abandon(model, run_id, "lost the model's lease before submitting")
    return False


def record_launch(ledger: FirestoreLedger, model: str, run_id: str, job: str) -> None:
    """Keep the job in the run's record. The job runs either way: a storage error here is
    logged, not raised (raising would abandon a run whose pipeline exists); the sweep
    finds the job by the run's :func:`launch_name` all the same."""
    try:
        ledger.launched(model, run_id, job)
    except Exception:
        log.exception("run %s of %s: launched as %s, but the ledger did not take it", run_id,
                      model, job)  # fmt: skip
