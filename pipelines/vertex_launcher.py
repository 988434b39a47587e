"""The Vertex AI Pipelines adapter of the ``PipelineLauncher`` port.

:class:`VertexLauncher` takes the model's waiting events from the ledger (after the
coalescing window) and submits one ``PipelineJob`` for them, named after the run
(:func:`~pipelines.launch.launch_name`), then returns: it never waits for the job. A
retried submit of the same run is refused by Vertex AI (409) and is quiet; the sweep asks
:meth:`VertexLauncher.state` whether a lease holder's job still runs.

``google.cloud.aiplatform`` takes about 2.4 s to import; it is imported on first use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipelines.launch import (
    JobState,
    gather_or_end,
    hold_for_run,
    launch_name,
    pipeline_parameters,
    record_launch,
)
from retrain import vertex_sdk
from retrain.vertex_sdk import label_value

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.ledger import FirestoreLedger, RunRecord

__all__ = ["VertexLauncher"]

log = logging.getLogger(__name__)


# A job in any other state ended. UNSPECIFIED counts as running: taking a lease over from
# a job whose state is not known yet could start a second job beside it.
_RUNNING = {"PIPELINE_STATE_QUEUED", "PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING",
            "PIPELINE_STATE_PAUSED", "PIPELINE_STATE_CANCELLING",
            "PIPELINE_STATE_UNSPECIFIED"}  # fmt: skip


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
        ledger: FirestoreLedger,
        *,
        template: str | None = None,
    ) -> None:
        self.settings = settings
        self.config_text = config_text
        self.ledger = ledger
        self.template = template

    def submit(self, model: str, run_id: str) -> None:
        """Take the waiting events of ``model`` into run ``run_id`` (which holds the model's
        lease) and submit one pipeline job for them, named after the run.

        Nothing waiting (another run covered the events) ends the run as ``abandoned``; a
        second submit of the same run finds its job and submits nothing.
        """
        inputs = gather_or_end(self.settings, self.ledger, model, run_id)
        if inputs is None:
            return
        from google.api_core.exceptions import Conflict  # noqa: PLC0415

        aiplatform = vertex_sdk.aiplatform()

        settings = self.settings
        job_id = launch_name(run_id)
        job = aiplatform.PipelineJob(
            display_name=job_id,
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
            # The job of this very run exists: an earlier attempt of this submit made it.
            name = self._job_name(job_id)
            log.info("run %s of %s: already launched as %s", run_id, model, name)
            record_launch(self.ledger, model, run_id, name)
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

    def scheduled(self, model: str, run_id: str) -> bool:
        """Whether ``run_id`` is a job that ``model``'s ``PipelineJobSchedule`` started: the
        job of that id exists, came from a schedule, and carries the labels that ``retrain
        schedule sync`` puts on the schedule's jobs (a scheduled job's steps take the job's
        id as their run id)."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        try:
            job = vertex_sdk.aiplatform().PipelineJob.get(
                self._job_name(run_id), project=self.settings.project,
                location=self.settings.region,
            )  # fmt: skip
        except NotFound:
            return False
        found = job.gca_resource
        labels = dict(found.labels)
        return (
            bool(found.schedule_name)
            and labels.get("retrain_model") == model
            and labels.get("retrain_reason") == "schedule"
        )

    def state(self, model: str, run: RunRecord) -> JobState:
        """The state of ``run``'s pipeline job, asked of Vertex AI by the run's job name."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        name = self._job_name(launch_name(run.run_id))
        try:
            job = vertex_sdk.aiplatform().PipelineJob.get(
                name, project=self.settings.project, location=self.settings.region
            )
        except NotFound:
            return "absent"
        state = job.gca_resource.state  # (job.state would fetch the job again)
        state = getattr(state, "name", str(state))
        log.info("run %s of %s: job %s is %s", run.run_id, model, name, state)
        return "running" if state in _RUNNING else "ended"
