"""``retrain schedule sync``: make the cloud's pipeline schedules match retrain.yaml.

Every model scheduled ``via: pipeline_schedule`` gets one schedule named ``retrain-<model>``
(the others tick through Cloud Scheduler, which Terraform makes) that starts
the pipeline with no run id and no data (the steps then take the job's own name as run
id, and the model's current data window), at most one run at a time:

- Vertex AI Pipelines: a ``PipelineJobSchedule`` with cron ``TZ=<timezone> <cron>``.
- Kubeflow Pipelines: a recurring run in ``gcp.kfp.experiment``, with KFP's 6-field cron
  (seconds first). KFP's cron has no time zone, so only ``timezone: UTC`` is accepted.

A schedule of ours (Vertex: its job carries the label ``retrain_model``; KFP: named
``retrain-<model>`` in our experiment) whose model is no longer scheduled so is deleted.
Each schedule carries a digest of what its runs get (template, parameters including the
text of retrain.yaml, service account, network, labels, caching); a schedule whose
digest differs is replaced, one whose cron alone differs is updated in place (Vertex) or
replaced (KFP, which cannot update a recurring run), and the rest are left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipelines.kfp_launcher import experiment_id, kfp_client, local_template, pipeline_package
from pipelines.launch import pipeline_parameters
from retrain import vertex_sdk

if TYPE_CHECKING:
    from retrain.config import Settings

__all__ = [
    "SCHEDULE_PREFIX",
    "Change",
    "ScheduleError",
    "kfp_cron",
    "sync_kfp_schedules",
    "sync_vertex_schedules",
    "vertex_cron",
]

log = logging.getLogger(__name__)

SCHEDULE_PREFIX = "retrain-"
MODEL_LABEL = "retrain_model"
DIGEST_LABEL = "retrain_spec"
_DIGEST_MARK = "spec "
_NO_SCHEDULE = "the model has no schedule in retrain.yaml"

Action = Literal["create", "update", "delete", "unchanged"]


@dataclass(frozen=True)
class Change:
    """What sync did (or, in a dry run, would do) to one model's schedule."""

    action: Action
    model: str
    cron: str  # as the API takes it; for a deletion, the deleted schedule's
    detail: str = ""


class ScheduleError(ValueError):
    """A schedule in retrain.yaml that the backend cannot run as written."""


def vertex_cron(cron: str, timezone: str) -> str:
    """Vertex AI's cron: the 5 fields, prefixed with the IANA time zone."""
    return f"TZ={timezone} {cron}"


def kfp_cron(model: str, cron: str, timezone: str) -> str:
    """KFP's 6-field cron (seconds first), which runs in UTC: other time zones are refused."""
    if timezone != "UTC":
        raise ScheduleError(
            f"models.{model}.schedule.timezone: {timezone!r}, but Kubeflow Pipelines "
            "recurring runs have no time zone (they run in UTC); give the cron in UTC and "
            "set timezone: UTC"
        )
    return f"0 {cron}"


def _digest(template: Path, parameters: dict[str, Any], **settings: Any) -> str:
    """What a schedule's runs get, in 16 hex digits (a label value and a description)."""
    body = json.dumps(
        {"parameters": parameters, **settings}, sort_keys=True, separators=(",", ":")
    ).encode()
    return hashlib.sha256(template.read_bytes() + b"\0" + body).hexdigest()[:16]


def _scheduled_models(settings: Settings) -> dict[str, tuple[str, str]]:
    """model -> (cron, timezone) for each model scheduled ``via: pipeline_schedule``; the
    others tick through Cloud Scheduler (infra/terraform), and must not run twice."""
    return {
        model: (spec.schedule.cron, spec.schedule.timezone)
        for model, spec in settings.models.items()
        if spec.schedule is not None and spec.schedule.via == "pipeline_schedule"
    }


# -- Vertex AI Pipelines -----------------------------------------------------------------


def sync_vertex_schedules(
    settings: Settings,
    config_text: str,
    *,
    template_for: Callable[[str], str] | None = None,
    dry_run: bool = False,
) -> list[Change]:
    """Create, update and delete ``PipelineJobSchedule`` s until they match retrain.yaml.

    ``template_for(model)`` is the compiled pipeline to schedule (default: the one that
    ``make deploy`` uploads, ``settings.pipeline_template(model)``). A dry run only lists
    the changes.
    """
    aiplatform = vertex_sdk.aiplatform()

    template_for = template_for or settings.pipeline_template
    ours: dict[str, list[Any]] = {}
    listed = aiplatform.PipelineJobSchedule.list(project=settings.project, location=settings.region)
    for schedule in listed:
        labels = schedule.gca_resource.create_pipeline_job_request.pipeline_job.labels
        if MODEL_LABEL in labels:
            ours.setdefault(labels[MODEL_LABEL], []).append(schedule)
    changes = []
    for model, (cron_text, timezone) in _scheduled_models(settings).items():
        cron = vertex_cron(cron_text, timezone)
        existing, *extra = ours.pop(model, []) or [None]
        for duplicate in extra:
            changes.append(_vertex_delete(duplicate, model, "a second schedule", dry_run))
        with local_template(template_for(model)) as template:
            job, digest = _vertex_job(aiplatform, settings, config_text, model, template)
            change = _vertex_sync_one(
                aiplatform, settings, job, digest, model, cron, existing, dry_run
            )
        changes.append(change)
    for model, stale in sorted(ours.items()):
        for schedule in stale:
            changes.append(_vertex_delete(schedule, model, _NO_SCHEDULE, dry_run))
    return changes


def _vertex_job(
    aiplatform: Any, settings: Settings, config_text: str, model: str, template: Path
) -> tuple[Any, str]:
    """The pipeline job that the model's schedule starts, labelled with its digest, and
    the digest."""
    parameters = pipeline_parameters(model, "", config_text)
    labels = {**settings.gcp.labels, MODEL_LABEL: model, "retrain_reason": "schedule"}
    digest = _digest(
        template,
        parameters,
        labels=labels,
        pipeline_root=settings.pipeline_root,
        enable_caching=settings.gcp.enable_caching,
        service_account=settings.pipeline_service_account,
        network=settings.gcp.network,
    )
    job = aiplatform.PipelineJob(
        display_name=f"{SCHEDULE_PREFIX}{model}",
        template_path=str(template),
        pipeline_root=settings.pipeline_root,
        parameter_values=parameters,
        enable_caching=settings.gcp.enable_caching,
        labels={**labels, DIGEST_LABEL: digest},
        project=settings.project,
        location=settings.region,
    )
    return job, digest


def _vertex_sync_one(
    aiplatform: Any,
    settings: Settings,
    job: Any,
    digest: str,
    model: str,
    cron: str,
    existing: Any | None,
    dry_run: bool,
) -> Change:
    """Create, replace, update or keep one model's schedule."""
    if existing is None:
        if not dry_run:
            _vertex_create(aiplatform, settings, job, model, cron)
        return Change("create", model, cron, f"digest {digest}")
    current = existing.gca_resource
    labels = current.create_pipeline_job_request.pipeline_job.labels
    if labels.get(DIGEST_LABEL) != digest:
        if not dry_run:
            existing.delete()
            _vertex_create(aiplatform, settings, job, model, cron)
        why = (
            f"replaced {existing.resource_name}: the pipeline, its parameters or its run "
            f"settings changed (digest {labels.get(DIGEST_LABEL)} -> {digest})"
        )
        return Change("update", model, cron, why)
    if current.cron != cron or current.max_concurrent_run_count != 1:
        if not dry_run:
            existing.update(cron=cron, max_concurrent_run_count=1)
        why = f"{existing.resource_name}: cron {current.cron!r} -> {cron!r}, at most one run"
        return Change("update", model, cron, why)
    state = current.state.name if current.state else "STATE_UNSPECIFIED"
    return Change("unchanged", model, cron, f"{existing.resource_name} ({state})")


def _vertex_create(aiplatform: Any, settings: Settings, job: Any, model: str, cron: str) -> None:
    schedule = aiplatform.PipelineJobSchedule(
        pipeline_job=job,
        display_name=f"{SCHEDULE_PREFIX}{model}",
        project=settings.project,
        location=settings.region,
    )
    schedule.create(
        cron=cron,
        max_concurrent_run_count=1,
        service_account=settings.pipeline_service_account,
        network=settings.gcp.network,
    )
    log.info("schedule of %s: created %s (%s)", model, schedule.resource_name, cron)


def _vertex_delete(schedule: Any, model: str, why: str, dry_run: bool) -> Change:
    cron = schedule.gca_resource.cron
    name = schedule.resource_name
    if not dry_run:
        schedule.delete()
        log.info("schedule of %s: deleted %s: %s", model, name, why)
    return Change("delete", model, cron, f"{name}: {why}")


# -- Kubeflow Pipelines ------------------------------------------------------------------


def sync_kfp_schedules(
    settings: Settings,
    config_text: str,
    client: Any | None = None,
    *,
    template_for: Callable[[str], str] | None = None,
    dry_run: bool = False,
) -> list[Change]:
    """Create and delete KFP recurring runs until they match retrain.yaml.

    ``client`` is a ``kfp.Client`` (default: one for ``gcp.kfp.host``). A model whose
    schedule is not in UTC is refused before anything changes (:class:`ScheduleError`).
    """
    wanted = {
        model: kfp_cron(model, cron, timezone)
        for model, (cron, timezone) in _scheduled_models(settings).items()
    }
    template_for = template_for or settings.pipeline_template
    client = client if client is not None else kfp_client(settings)
    experiment = experiment_id(client, settings, create=not dry_run)
    ours: dict[str, list[Any]] = {}
    for recurring in _recurring_runs(client, experiment):
        name = recurring.display_name or ""
        if name.startswith(SCHEDULE_PREFIX):
            ours.setdefault(name.removeprefix(SCHEDULE_PREFIX), []).append(recurring)
    changes = []
    for model, cron in wanted.items():
        existing, *extra = ours.pop(model, []) or [None]
        for duplicate in extra:
            changes.append(_kfp_delete(client, duplicate, model, "a second schedule", dry_run))
        with pipeline_package(template_for(model), settings.gcp.enable_caching) as template:
            target = _KfpTarget(settings, config_text, experiment, template, model, cron)
            changes.append(_kfp_sync_one(client, target, existing, dry_run))
    for model, stale in sorted(ours.items()):
        for recurring in stale:
            changes.append(_kfp_delete(client, recurring, model, _NO_SCHEDULE, dry_run))
    return changes


def _recurring_runs(client: Any, experiment: str | None) -> list[Any]:
    if experiment is None:  # a dry run before the experiment exists
        return []
    found: list[Any] = []
    token = ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment, page_size=100, page_token=token)
        found += page.recurring_runs or []
        token = page.next_page_token or ""
        if not token:
            return found


@dataclass(frozen=True)
class _KfpTarget:
    """The recurring run that a model with a schedule should have."""

    settings: Settings
    config_text: str
    experiment: str | None
    template: Path  # the pipeline package, caching already set
    model: str
    cron: str


def _kfp_sync_one(client: Any, target: _KfpTarget, existing: Any | None, dry_run: bool) -> Change:
    """Create, replace or keep one model's recurring run (KFP cannot update one)."""
    settings, model, cron, template = target.settings, target.model, target.cron, target.template
    parameters = pipeline_parameters(model, "", target.config_text)
    digest = _digest(
        template,
        parameters,
        pipeline_root=settings.pipeline_root,
        enable_caching=settings.gcp.enable_caching,
    )
    description = f"retrain {model} on its schedule; {_DIGEST_MARK}{digest}"
    if existing is not None:
        trigger = existing.trigger
        current = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None
        same = (
            current == cron
            and (existing.description or "").endswith(f"{_DIGEST_MARK}{digest}")
            and existing.max_concurrency in (1, "1")  # int64 is a JSON string in KFP's API
        )
        if same:
            return Change("unchanged", model, cron, f"recurring run {existing.recurring_run_id}")
        if not dry_run:
            client.delete_recurring_run(existing.recurring_run_id)
    if not dry_run:
        created = client.create_recurring_run(
            experiment_id=target.experiment,
            job_name=f"{SCHEDULE_PREFIX}{model}",
            description=description,
            cron_expression=cron,
            max_concurrency=1,
            no_catchup=True,  # a missed night is not made up for with a burst of runs
            params=parameters,
            pipeline_package_path=str(template),
            enabled=True,
            pipeline_root=settings.pipeline_root,
            enable_caching=settings.gcp.enable_caching,
        )
        log.info("schedule of %s: created recurring run %s", model, created.recurring_run_id)
    if existing is None:
        return Change("create", model, cron, description)
    why = f"replaced recurring run {existing.recurring_run_id}: KFP cannot update one in place"
    return Change("update", model, cron, why)


def _kfp_delete(client: Any, recurring: Any, model: str, why: str, dry_run: bool) -> Change:
    trigger = recurring.trigger
    cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else ""
    identifier = recurring.recurring_run_id
    if not dry_run:
        client.delete_recurring_run(identifier)
        log.info("schedule of %s: deleted recurring run %s: %s", model, identifier, why)
    return Change("delete", model, cron, f"recurring run {identifier}: {why}")
