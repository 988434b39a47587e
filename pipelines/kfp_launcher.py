"""The Kubeflow Pipelines adapter of the ``PipelineLauncher`` port (e.g. KFP on GKE).

:class:`KfpLauncher` takes the model's pending events from the ledger and creates one
run for them through ``kfp.Client``, in the experiment ``gcp.kfp.experiment``, then
returns without waiting. The run's name is derived from the dedupe keys that it covers
(as the Vertex AI job id is); KFP does not refuse a duplicate name, so the launcher
looks for a run of that name in the experiment first.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines.launch import (
    JobState,
    gather_or_end,
    hold_for_run,
    launch_name,
    pipeline_parameters,
    record_launch,
)

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.ledger import FirestoreLedger, RunRecord

__all__ = ["KfpLauncher", "experiment_id", "kfp_client", "local_template", "pipeline_package"]

log = logging.getLogger(__name__)


def kfp_client(settings: Settings) -> Any:
    """A ``kfp.Client`` for ``gcp.kfp.host``; its constructor checks the server's health.

    Authentication beyond the host (IAP, tokens) comes from kfp's own environment
    variables, e.g. ``KF_PIPELINES_IAP_OAUTH2_CLIENT_ID``.
    """
    import kfp  # noqa: PLC0415 (0.5 s to import)

    kfp_settings = settings.gcp.kfp
    if kfp_settings.host is None:
        raise ValueError("gcp.kfp.host: the KFP API server's URL is needed to launch on KFP")
    options: dict[str, Any] = {"host": kfp_settings.host}
    if kfp_settings.namespace:
        options["namespace"] = kfp_settings.namespace
    with warnings.catch_warnings():
        # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": we
        # speak the v2beta1 API only, so the warning says nothing on each construction.
        warnings.filterwarnings("ignore", "This client only works", FutureWarning)
        return kfp.Client(**options)


def experiment_id(client: Any, settings: Settings, *, create: bool = True) -> str | None:
    """The id of the experiment ``gcp.kfp.experiment``, created if missing (unless
    ``create`` is false: then None)."""
    name = settings.gcp.kfp.experiment
    namespace = settings.gcp.kfp.namespace
    if create:
        return str(client.create_experiment(name=name, namespace=namespace).experiment_id)
    try:
        return str(client.get_experiment(experiment_name=name, namespace=namespace).experiment_id)
    except ValueError as exc:  # kfp: "No experiment is found with name ..."
        if str(exc).startswith("No experiment is found"):
            return None
        raise


@contextmanager
def local_template(template: str) -> Iterator[Path]:
    """The compiled pipeline ``template`` as a local file: a ``gs://`` URI is downloaded
    to a temporary file, removed on exit; a local path is used as it is."""
    if not template.startswith("gs://"):
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline template {template}: no such file")
        yield path
        return
    from retrain import blobstore  # noqa: PLC0415 (google-cloud-storage)

    data = blobstore.read_bytes(template)
    if data is None:
        raise FileNotFoundError(
            f"pipeline template {template} does not exist; `make deploy` uploads it"
        )
    with tempfile.TemporaryDirectory(prefix="retrain-template-") as folder:
        path = Path(folder) / "pipeline.yaml"  # kfp reads a package by its extension
        path.write_bytes(data)
        yield path


@contextmanager
def pipeline_package(template: str, enable_caching: bool) -> Iterator[Path]:
    """The compiled pipeline ``template`` as a local file for ``kfp.Client``, with the
    caching of every task set to ``enable_caching``.

    ``kfp.Client``'s own ``enable_caching`` (2.17) reaches only the tasks of the root DAG,
    not the steps inside the exit handler's DAG, which would stay cached.
    """
    with local_template(template) as source:
        documents = list(yaml.safe_load_all(source.read_text(encoding="utf-8")))
    spec = documents[0]
    for component in [spec["root"], *spec.get("components", {}).values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            task["cachingOptions"] = {"enableCache": enable_caching}
    with tempfile.TemporaryDirectory(prefix="retrain-package-") as folder:
        path = Path(folder) / "pipeline.yaml"
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
        yield path


class KfpLauncher:
    """Creates each run on a Kubeflow Pipelines server and returns without waiting for it.

    ``template`` is the compiled pipeline (a local path or ``gs://`` URI); by default
    ``settings.pipeline_template(model)``. ``client`` is a ``kfp.Client``; by default one
    for ``gcp.kfp.host`` is made on first use, and kept.
    """

    def __init__(
        self,
        settings: Settings,
        config_text: str,
        ledger: FirestoreLedger,
        *,
        template: str | None = None,
        client: Any | None = None,
    ) -> None:
        self.settings = settings
        self.config_text = config_text
        self.ledger = ledger
        self.template = template
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = kfp_client(self.settings)
        return self._client

    def submit(self, model: str, run_id: str) -> None:
        """Take the waiting events of ``model`` into run ``run_id`` (which holds the model's
        lease) and create one KFP run for them, named after the run.

        Nothing waiting ends the run as ``abandoned``; a second submit of the same run
        finds its KFP run by name and creates nothing.
        """
        inputs = gather_or_end(self.settings, self.ledger, model, run_id)
        if inputs is None:
            return
        settings = self.settings
        client = self.client
        name = launch_name(run_id)
        experiment = experiment_id(client, settings)
        earlier = _run_named(client, experiment, name)
        if earlier is not None:  # an earlier attempt of this submit created it
            log.info("run %s of %s: already launched as KFP run %s", run_id, model,
                     earlier.run_id)  # fmt: skip
            record_launch(self.ledger, model, run_id,
                          f"{settings.gcp.kfp.host}#runs/{earlier.run_id}")  # fmt: skip
            return
        if not hold_for_run(self.ledger, model, run_id, settings.models[model].lease_seconds):
            return
        template = self.template or settings.pipeline_template(model)
        with pipeline_package(template, settings.gcp.enable_caching) as package:
            result = client.create_run_from_pipeline_package(
                pipeline_file=str(package),
                arguments=pipeline_parameters(model, run_id, self.config_text, inputs),
                run_name=name,
                experiment_id=experiment,
                pipeline_root=settings.pipeline_root,
                enable_caching=settings.gcp.enable_caching,
                # A Kubernetes service account, not the Google one: the namespace's default
                # (e.g. pipeline-runner, or default-editor with Workload Identity) runs it.
                service_account=None,
            )
        record_launch(self.ledger, model, run_id, f"{settings.gcp.kfp.host}#runs/{result.run_id}")
        log.info(
            "run %s of %s: created KFP run %s (%s) in experiment %s for %d event(s)",
            run_id, model, result.run_id, name, experiment, len(inputs.requests),
        )  # fmt: skip

    def scheduled(self, model: str, run_id: str) -> bool:
        """Whether ``run_id`` names a run of our experiment that a recurring run started
        (``retrain schedule sync`` makes one per ``pipeline_schedule`` model)."""
        del model
        experiment = experiment_id(self.client, self.settings, create=False)
        if experiment is None:
            return False
        found = _run_named(self.client, experiment, run_id)
        return found is not None and bool(getattr(found, "recurring_run_id", None))

    def state(self, model: str, run: RunRecord) -> JobState:
        """The state of ``run``'s KFP run, found by the run's name in the experiment."""
        experiment = experiment_id(self.client, self.settings, create=False)
        if experiment is None:
            return "absent"
        found = _run_named(self.client, experiment, launch_name(run.run_id))
        if found is None:
            return "absent"
        log.info("run %s of %s: KFP run %s is %s", run.run_id, model, found.run_id, found.state)
        return "running" if str(found.state) in _RUNNING else "ended"


# KFP v2beta1 RuntimeState; UNSPECIFIED counts as running (see pipelines/vertex_launcher.py).
_RUNNING = {"PENDING", "RUNNING", "PAUSED", "CANCELING", "RUNTIME_STATE_UNSPECIFIED"}


def _run_named(client: Any, experiment: str | None, name: str) -> Any | None:
    """The run of the experiment whose display name is ``name``, if there is one."""
    name_filter = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    found = client.list_runs(experiment_id=experiment, filter=name_filter, page_size=10)
    return found.runs[0] if found.runs else None
