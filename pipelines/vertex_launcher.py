"""The Vertex AI Pipelines adapter of the ``PipelineLauncher`` port.

:class:`VertexLauncher` takes the model's pending events from the ledger (after the
coalescing window) and submits one ``PipelineJob`` for them, then returns: it never
waits for the job. The job id is derived from the dedupe keys that the run covers, so a
second launch of the same events is refused by Vertex AI (409 ``ALREADY_EXISTS``)
instead of training twice.

``google.cloud.aiplatform`` takes about 2.4 s to import; it is imported on first submit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from retrain import vertex_sdk
from retrain.data_objects import RunInputs, gather
from retrain.vertex_sdk import label_value

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.ledger import GcsLedger

__all__ = [
    "VertexLauncher",
    "gather_or_end",
    "hold_for_run",
    "launch_name",
    "pipeline_parameters",
    "record_launch",
    "settle_relaunch",
]

log = logging.getLogger(__name__)


def launch_name(model: str, dedupe_keys: Iterable[str]) -> str:
    """The Vertex job id (or KFP run name) of a run that covers ``dedupe_keys``.

    The same events always give the same name, so a second launch of them is refused by
    the API. It matches Vertex AI's job id pattern ``[a-z][-a-z0-9]{0,127}``, since model
    names are ``[a-z][a-z0-9-]{0,62}``.
    """
    digest = hashlib.sha256("\n".join(sorted(dedupe_keys)).encode()).hexdigest()[:16]
    return f"retrain-{model}-{digest}"


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
    settings: Settings, ledger: GcsLedger, model: str, run_id: str
) -> RunInputs | None:
    """:func:`~retrain.data_objects.gather`; with nothing pending (another run covered the
    events), the run ends as abandoned and None is returned: there is nothing to launch."""
    try:
        return gather(settings, ledger, model, run_id)
    except LookupError as exc:
        log.info("run %s of %s: %s", run_id, model, exc)
        ledger.finish(model, run_id, "abandoned", str(exc))
        return None


def settle_relaunch(
    ledger: GcsLedger,
    model: str,
    run_id: str,
    launched_as: str,
    earlier_run: str | None,
    *,
    running: bool,
    ttl: float,
) -> None:
    """The events of ``run_id`` were launched already, as ``launched_as``.

    If that launch was this very run's (a retried request), nothing is left to do. If it
    was an earlier run's, that run's lease expired and the ledger requeued its events,
    which this run then took. The pipeline that covers them exists, so this run launches
    nothing and ends as ``abandoned``. If that pipeline still runs, the lease goes to the
    earlier run, whose report releases it: one run per model at a time. If it ended, the
    lease is freed for the next run instead of waiting for it to expire.
    """
    if earlier_run == run_id:
        log.info("run %s of %s: already launched as %s", run_id, model, launched_as)
        return
    error = (
        f"its events were launched already as {launched_as} "
        f"(by run {earlier_run or 'unknown'}); nothing new to run"
    )
    log.warning("run %s of %s: %s", run_id, model, error)
    if running and earlier_run:
        ledger.hand_over(model, run_id, earlier_run, ttl, error)
    else:
        ledger.finish(model, run_id, "abandoned", error)


def hold_for_run(ledger: GcsLedger, model: str, run_id: str, ttl: float) -> bool:
    """Before submitting, extend the model's lease from the gathering's few minutes to the
    run's ``ttl``: a job must never run on the short lease, or the next event would take the
    model over and start a second run. False if the lease is lost (taken over meanwhile):
    the gathered events go back to the queue and nothing is submitted."""
    if ledger.renew(model, run_id, ttl):
        return True
    log.warning("run %s of %s: lost the model's lease before submitting", run_id, model)
    ledger.abandon(model, run_id, "lost the model's lease before submitting")
    return False


def record_launch(ledger: GcsLedger, model: str, run_id: str, job: str) -> None:
    """Keep the job in the run's record. The job runs either way: a storage error here is
    logged, not raised (raising would abandon a run whose pipeline exists)."""
    try:
        ledger.launched(model, run_id, job)
    except Exception:
        log.exception("run %s of %s: launched as %s, but the ledger did not take it", run_id,
                      model, job)  # fmt: skip


_RUNNING = {"PIPELINE_STATE_QUEUED", "PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING",
            "PIPELINE_STATE_PAUSED", "PIPELINE_STATE_CANCELLING"}  # fmt: skip


class VertexLauncher:
    """Submits each run as a Vertex AI ``PipelineJob`` and returns without waiting for it.

    ``template`` is the compiled pipeline (a local path or ``gs://`` URI); by default the
    one that ``make deploy`` uploads for the model, ``settings.pipeline_template(model)``.
    ``config_text`` (the text of retrain.yaml) is the pipeline's ``config_yaml`` parameter.
    """

    def __init__(
        self,
        settings: Settings,
        config_text: str,
        ledger: GcsLedger,
        *,
        template: str | None = None,
    ) -> None:
        self.settings = settings
        self.config_text = config_text
        self.ledger = ledger
        self.template = template

    def submit(self, model: str, run_id: str) -> None:
        """Take the pending events of ``model`` into run ``run_id`` (which holds the model's
        lease) and submit one pipeline job for them.

        Nothing pending (another run covered the events) ends the run as ``abandoned``.
        Events that a job was launched for already are not launched again.
        """
        inputs = gather_or_end(self.settings, self.ledger, model, run_id)
        if inputs is None:
            return
        from google.api_core.exceptions import Conflict  # noqa: PLC0415

        aiplatform = vertex_sdk.aiplatform()

        settings = self.settings
        job_id = launch_name(model, inputs.dedupe_keys)
        job = aiplatform.PipelineJob(
            display_name=f"retrain-{run_id}"[:128],
            template_path=self.template or settings.pipeline_template(model),
            job_id=job_id,
            pipeline_root=settings.pipeline_root,
            parameter_values=pipeline_parameters(model, run_id, self.config_text, inputs),
            enable_caching=settings.gcp.enable_caching,
            labels={
                **settings.gcp.labels,
                "retrain_model": model,
                "retrain_run": label_value(run_id),
                "retrain_reason": label_value(inputs.reason),
            },
            project=settings.project,
            location=settings.region,
        )
        if not hold_for_run(self.ledger, model, run_id, settings.models[model].lease_seconds):
            return
        try:
            # Before its create call, submit() looks up the pipeline root's bucket (and
            # would create it if missing), and asks Resource Manager for the project number.
            job.submit(
                service_account=settings.pipeline_service_account,
                network=settings.gcp.network,
            )
        except Conflict:  # AlreadyExists over gRPC; over REST a 409 arrives as Conflict
            name = self._job_name(job_id)
            found = self._run_of(aiplatform, name)
            if found is None:  # not there after all: a real conflict, not a relaunch
                raise
            earlier, running = found
            settle_relaunch(
                self.ledger, model, run_id, f"Vertex AI pipeline job {name}", earlier,
                running=running, ttl=settings.models[model].lease_seconds,
            )  # fmt: skip
            return
        record_launch(self.ledger, model, run_id, job.resource_name)
        log.info(
            "run %s of %s: submitted Vertex AI pipeline job %s for %d event(s), %d object(s)",
            run_id, model, job.resource_name, len(inputs.requests), len(inputs.data_uris),
        )  # fmt: skip

    def _job_name(self, job_id: str) -> str:
        return (
            f"projects/{self.settings.project}/locations/{self.settings.region}"
            f"/pipelineJobs/{job_id}"
        )

    def _run_of(self, aiplatform: Any, name: str) -> tuple[str, bool] | None:
        """The run id that the existing job ``name`` was launched with (``""`` if none),
        and whether it still runs; None if there is no such job."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        try:
            job = aiplatform.PipelineJob.get(
                name, project=self.settings.project, location=self.settings.region
            )
        except NotFound:
            return None
        values = job.gca_resource.runtime_config.parameter_values
        state = job.gca_resource.state  # (job.state would fetch the job again)
        state = getattr(state, "name", str(state))
        return (str(values["run_id"]) if "run_id" in values else ""), state in _RUNNING
