"""The Vertex AI adapters (``backend: vertex``): Model Registry and endpoint.

Where the truth lives:

- **GCS** keeps what it keeps for the local backend (see :mod:`serving.registry`): every
  version's record with its exact metrics, lineage and verdict, the decisions, the audit
  trail, and ``champion.json``, whose generation precondition is *the* lock of every
  promotion. :meth:`VertexRegistry.champion` and :meth:`~VertexRegistry.version` read
  GCS, so the prediction server, the evaluate step and the gatekeeper need neither the
  2.4 s import of ``google-cloud-aiplatform`` nor a Vertex AI call to read the champion.
- **Vertex AI Model Registry** is what people see: one model per retrain model (resource
  id = the model name), one version per run, labelled with the run, the request and the
  metrics, and the ``champion`` and ``default`` aliases on the champion. It is a
  projection that :meth:`VertexRegistry.promote` moves *after* the GCS compare-and-swap.
  The two are joined by ``vertex_version_id`` in each GCS version record, and by the
  ``retrain_version`` / ``retrain_run`` labels on each Vertex version.

Layout added to the GCS registry::

    registry/<model>/versions/<version>.json  + vertex_model, vertex_version_id
    registry/<model>/vertex.json              the last champion alias move that completed:
                                              {"version", "vertex_version_id", "at"}

``vertex.json`` tells "Vertex lags behind GCS" (a promotion died between the GCS swap and
the alias move: safe to finish) from "someone moved the alias in the console" (not ours to
overwrite: the promotion is refused as stale).

And, while an endpoint change is under way (see :class:`VertexEndpoint`)::

    registry/<model>/deploy.json              the change that :meth:`VertexEndpoint.deploy`
                                              started and has not finished; deleted when done
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from retrain.vertex_sdk import aiplatform, label_value
from serving.registry import GcsRegistryWriter, RegistryError

if TYPE_CHECKING:
    from retrain.config import Settings

__all__ = [
    "CHAMPION_ALIAS",
    "DeployError",
    "DeployedVersion",
    "TrafficPlan",
    "VertexEndpoint",
    "VertexRegistry",
    "plan_traffic",
]

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
_DEFAULT_ALIAS = "default"  # the version used when none is named; Vertex keeps exactly one
_PREDICT_ROUTE, _HEALTH_ROUTE, _HTTP_PORT = "/predict", "/health", 8080  # the serving image's
_MAX_LABELS = 64
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_NOT_LABEL = re.compile(r"[^a-z0-9_-]")


class DeployError(RuntimeError):
    """The endpoint is not in the state a deployment expects; the message names it."""


def _number_label(number: float) -> str:
    """0.81234 -> ``0_8123``; 2000.0 -> ``2000``: labels take no '.' (nor '+')."""
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    text = f"{number:.4f}" if abs(number) < 1e12 else f"{number:.4e}"
    return text.replace(".", "_").replace("+", "")


def _metric_labels(metrics: Mapping[str, Any], room: int) -> dict[str, str]:
    """Up to ``room`` metrics as labels, by name (a name that is no label key is mapped)."""
    labels: dict[str, str] = {}
    for name in sorted(metrics):
        if len(labels) >= room:
            break
        key = _NOT_LABEL.sub("_", name.lower())[:63]
        key = key if _LABEL_KEY.match(key) else f"m_{key}"[:63]
        labels[key] = _number_label(float(metrics[name]))
    return labels


class VertexRegistry(GcsRegistryWriter):
    """The GCS registry writer whose versions and ``champion`` alias also live in Vertex AI
    Model Registry (see the module docstring for which side holds what).

    ``client`` is a ``google.cloud.storage.Client`` (or a stand-in with its interface);
    the Vertex AI SDK uses its global configuration (``aiplatform.init``) for credentials
    and endpoint, and ``settings.project`` / ``settings.region`` for every resource.
    """

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        super().__init__(settings.buckets.artifacts, client)
        self.settings = settings
        self._where = {"project": settings.project, "location": settings.region}

    # -- names -------------------------------------------------------------------------

    def vertex_model(self, model: str) -> str:
        """The model's resource name (its id is the model name, fixed at the first upload)."""
        return f"projects/{self.settings.project}/locations/{self.settings.region}/models/{model}"

    def _sync_uri(self, model: str) -> str:
        return f"{self.root}/{model}/vertex.json"

    # -- the endpoint change under way (used by VertexEndpoint) -------------------------

    def deploy_uri(self, model: str) -> str:
        return f"{self.root}/{model}/deploy.json"

    def deploy_record(self, model: str) -> tuple[dict[str, Any], int] | None:
        """The endpoint change under way and its generation, or None if there is none."""
        found = self._read_gen(self.deploy_uri(model))
        if found is not None and not isinstance(found[0], dict):
            raise RegistryError(f"{self.deploy_uri(model)}: expected a JSON object")
        return found

    def write_deploy_record(self, model: str, value: dict[str, Any], generation: int) -> int | None:
        """Write the record if its generation is still ``generation`` (0: only if there is
        none); its new generation, or None if another call wrote or removed it first."""
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        blob = self._bucket().blob(self._name(self.deploy_uri(model)))
        try:
            blob.upload_from_string(
                json.dumps(value, indent=2),
                content_type="application/json",
                if_generation_match=generation,
            )
        except PreconditionFailed:
            return None
        return int(blob.generation)

    def clear_deploy_record(self, model: str, generation: int) -> bool:
        """Delete the record if its generation is still ``generation``."""
        from google.api_core.exceptions import NotFound, PreconditionFailed  # noqa: PLC0415

        blob = self._bucket().blob(self._name(self.deploy_uri(model)))
        try:
            blob.delete(if_generation_match=generation)
        except (NotFound, PreconditionFailed):
            return False
        return True

    # -- register ----------------------------------------------------------------------

    def register(self, model: str, record: dict[str, Any]) -> tuple[str, bool]:
        """A version for ``record["run_id"]``, in GCS and in Vertex AI, once (idempotent).

        GCS first: its create-only objects settle which delivery of a report owns the
        version number. Then :meth:`vertex_version` uploads it, unless an earlier
        delivery already did.
        """
        version, created = super().register(model, record)
        self.vertex_version(model, version)
        return version, created

    def vertex_version(self, model: str, version: str) -> str:
        """The Vertex version id joined to ``version``; uploads the version if it has none.

        A redelivery that finds the id in the GCS record uploads nothing. One that died
        after the upload and before it kept the id finds the upload by its run label.
        Two concurrent deliveries may both upload: the first to keep its id wins, the
        other deletes its own upload.
        """
        record = self._read(self.version_uri(model, version))
        if record is None:
            raise RegistryError(f"{model} has no version {version}")
        if record.get("vertex_version_id"):
            return str(record["vertex_version_id"])
        run_id = record.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise RegistryError(f"{self.version_uri(model, version)}: no run_id to upload it by")
        exists, found = self._find_run(model, run_id)
        vertex_id = found or self._upload(model, version, record, exists)
        return self._join(model, version, vertex_id, uploaded=found is None)

    def _find_run(self, model: str, run_id: str) -> tuple[bool, str | None]:
        """Whether the Vertex model exists, and its first version labelled ``run_id``."""
        from google.api_core.exceptions import GoogleAPICallError, NotFound  # noqa: PLC0415

        registry = aiplatform().models.ModelRegistry(self.vertex_model(model), **self._where)
        wanted = f'labels.retrain_run="{label_value(run_id)}"'
        try:
            versions = registry.list_versions(filter=wanted)
        except NotFound:
            return False, None  # no model yet: nothing was uploaded
        except GoogleAPICallError as exc:
            raise RegistryError(
                f"{self.vertex_model(model)}: listing versions failed: {exc}"
            ) from exc
        ids = sorted(int(v.version_id) for v in versions)
        return True, str(ids[0]) if ids else None

    def _labels(self, model: str, version: str, record: dict[str, Any]) -> dict[str, str]:
        ours = {"retrain_model": model, "retrain_version": version,
                "retrain_run": label_value(str(record["run_id"]))}  # fmt: skip
        if record.get("request_id"):
            from retrain.ledger import event_hash  # noqa: PLC0415

            # The same hash names the request's claim in the ledger (events/<hash>.json).
            ours["retrain_request"] = event_hash(str(record["request_id"]))
        given = dict(self.settings.gcp.labels)
        room = _MAX_LABELS - len(given.keys() | ours.keys())
        metrics = {k: v for k, v in _metric_labels(record.get("metrics") or {}, room).items()
                   if k not in given and k not in ours}  # fmt: skip
        return {**metrics, **given, **ours}

    @staticmethod
    def _description(model: str, version: str, record: dict[str, Any]) -> str:
        metrics = ", ".join(
            f"{name} {float(value):.6g}"
            for name, value in sorted((record.get("metrics") or {}).items())
        )
        return (
            f"retrain {model} v{version}: run {record.get('run_id')}, "
            f"request {record.get('request_id')}, reason {record.get('reason')}; {metrics}"
        )

    def _upload(self, model: str, version: str, record: dict[str, Any], exists: bool) -> str:
        """Upload the version: the model's first (its id fixed to ``model``) or a new one."""
        from google.api_core.exceptions import Conflict, GoogleAPICallError  # noqa: PLC0415

        sdk = aiplatform()
        name = self.vertex_model(model)
        upload = {
            "display_name": model,
            "artifact_uri": str(record["artifact_uri"]),
            "serving_container_image_uri": self.settings.serving_image,
            # Vertex AI passes these to the container as AIP_PREDICT_ROUTE, AIP_HEALTH_ROUTE
            # and AIP_HTTP_PORT; our serving image (serving.vertex_container) honours them.
            "serving_container_predict_route": _PREDICT_ROUTE,
            "serving_container_health_route": _HEALTH_ROUTE,
            "serving_container_ports": [_HTTP_PORT],
            # Names in our container's logs and health answer (serving/vertex_container.py).
            "serving_container_environment_variables": {
                "RETRAIN_MODEL": model,
                "RETRAIN_MODEL_VERSION": version,
            },
            "labels": self._labels(model, version, record),
            "is_default_version": False,  # the champion alias moves "default", not uploads
            "version_description": self._description(model, version, record),
            "sync": True,
            **self._where,
        }
        try:
            if exists:
                uploaded = sdk.Model.upload(parent_model=name, **upload)
            else:
                try:
                    uploaded = sdk.Model.upload(model_id=model, **upload)
                except Conflict:  # a concurrent first registration created it meanwhile
                    # (REST answers 409 as Conflict; gRPC as its subclass AlreadyExists)
                    uploaded = sdk.Model.upload(parent_model=name, **upload)
        except GoogleAPICallError as exc:
            raise RegistryError(f"{model} v{version}: upload to {name} failed: {exc}") from exc
        return str(uploaded.version_id)

    def _join(self, model: str, version: str, vertex_id: str, uploaded: bool) -> str:
        """Keep ``vertex_id`` in the version record, unless another delivery kept one first."""
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        uri = self.version_uri(model, version)
        for _ in range(10):
            found = self._read_gen(uri)
            if found is None:
                raise RegistryError(f"{uri} disappeared while it was uploaded")
            value, generation = found
            kept = value.get("vertex_version_id")
            if kept:
                if str(kept) != vertex_id and uploaded:
                    # A concurrent delivery uploaded the same run and kept its id first.
                    registry = aiplatform().models.ModelRegistry(
                        self.vertex_model(model), **self._where
                    )
                    registry.delete_version(vertex_id)
                return str(kept)
            value.update(vertex_model=self.vertex_model(model), vertex_version_id=vertex_id)
            try:
                self._bucket().blob(self._name(uri)).upload_from_string(
                    json.dumps(value, indent=2),
                    content_type="application/json",
                    if_generation_match=generation,
                )
            except PreconditionFailed:
                continue  # a verdict or another delivery wrote meanwhile: read again
            return vertex_id
        raise RegistryError(f"{uri} keeps changing; gave up keeping its Vertex version id")

    # -- the champion alias ------------------------------------------------------------

    def _alias_holder(self, model: str, alias: str = CHAMPION_ALIAS) -> str | None:
        """The Vertex version id that holds ``alias``, or None."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        try:
            found = aiplatform().Model(
                model_name=f"{self.vertex_model(model)}@{alias}", **self._where
            )
        except NotFound:
            return None
        return str(found.version_id)

    def _joined_id(self, model: str, version: str | None) -> str | None:
        """The Vertex id kept in ``version``'s record (None for none, or for a version from
        before the Vertex backend)."""
        if version is None:
            return None
        record = self._read(self.version_uri(model, version))
        kept = record.get("vertex_version_id") if record else None
        return str(kept) if kept else None

    def _synced_id(self, model: str) -> str | None:
        """The Vertex id of the last alias move that completed, or None."""
        found = self._read(self._sync_uri(model))
        kept = found.get("vertex_version_id") if found else None
        return str(kept) if kept else None

    def _vertex_agrees(self, model: str, expected: str | None, target: str) -> bool:
        """Whether Vertex's ``champion`` alias allows the move from ``expected``.

        It does if the alias is on ``expected`` (the normal case), already on the target
        (an operator adopts what was set in the console), on no version (nobody chose
        another champion), or where our last completed move left it (Vertex merely lags
        behind a promotion that died before moving it). Any other holder was set by hand
        outside retrain: the promotion is stale.
        """
        holder = self._alias_holder(model)
        if holder is None or holder in (target, self._joined_id(model, expected)):
            return True
        return holder == self._synced_id(model)

    def _project(self, model: str) -> None:
        """Move ``champion`` and ``default`` to the GCS champion, until GCS holds still.

        Two promotions that follow each other may move the alias in the wrong order; each
        re-reads the pointer after its move, so the later one puts it right.
        """
        from google.api_core.exceptions import GoogleAPICallError  # noqa: PLC0415

        registry = aiplatform().models.ModelRegistry(self.vertex_model(model), **self._where)
        for _ in range(10):
            pointer = self.champion_pointer(model)
            if pointer is None:
                return
            version = str(pointer[0]["version"])
            vertex_id = self.vertex_version(model, version)
            try:
                # Vertex moves an alias that another version holds: no separate removal.
                registry.add_version_aliases([CHAMPION_ALIAS, _DEFAULT_ALIAS], version=vertex_id)
            except GoogleAPICallError as exc:
                raise RegistryError(
                    f"{model} v{version} is the champion in GCS, but moving the Vertex alias "
                    f"to {self.vertex_model(model)}@{vertex_id} failed (a redelivery or "
                    f"`sync_champion` finishes it): {exc}"
                ) from exc
            self._bucket().blob(self._name(self._sync_uri(model))).upload_from_string(
                json.dumps({"version": version, "vertex_version_id": vertex_id,
                            "at": time.time()}, indent=2),
                content_type="application/json",
            )  # fmt: skip
            again = self.champion_pointer(model)
            if again is None or str(again[0]["version"]) == version:
                return
        raise RegistryError(f"{self.champion_uri(model)} keeps moving; gave up following it")

    def promote(self, model: str, version: str, expected: str | None, by: str, reason: str) -> bool:
        """Make ``version`` the champion only if the champion is still ``expected``, in GCS
        (the lock) and in Vertex AI (no one moved its alias by hand); then move the alias.

        False, with nothing moved, if either says the champion is no longer ``expected``.
        """
        target = self.vertex_version(model, version)  # uploads a version that lacks it
        if not self._vertex_agrees(model, expected, target):
            return False
        if not super().promote(model, version, expected, by, reason):
            return False
        self._project(model)
        return True

    def sync_champion(self, model: str) -> bool:
        """Finish a promotion that died between the GCS swap and the alias move.

        True if Vertex's ``champion`` alias now names the GCS champion (or there is none);
        False if someone moved the alias by hand, which is left alone for an operator.
        """
        pointer = self.champion_pointer(model)
        if pointer is None:
            return True
        target = self.vertex_version(model, str(pointer[0]["version"]))
        holder = self._alias_holder(model)
        if holder == target:
            return True
        if holder is not None and holder != self._synced_id(model):
            return False
        self._project(model)
        return True


# -- serving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployedVersion:
    """One deployed model on the endpoint, as far as traffic planning cares."""

    id: str  # the deployed model's id on the endpoint
    version_id: str  # its Vertex model version id ("" if it is another model's)
    share: int  # its traffic percentage

    @property
    def rank(self) -> int:
        return int(self.version_id) if self.version_id.isdigit() else -1


@dataclass(frozen=True)
class TrafficPlan:
    """What :meth:`VertexEndpoint.deploy` does: deploy the target (its key in ``split`` is
    ``"0"``) or only set ``split``; then undeploy ``undeploy``, which no longer serve."""

    deploy: bool
    split: dict[str, int]
    undeploy: tuple[str, ...] = field(default=())


def plan_traffic(deployed: Sequence[DeployedVersion], target: str, canary: int) -> TrafficPlan:
    """The endpoint state that serves Vertex version ``target``.

    - A version at least as new as any deployed one goes forward: with ``canary`` N > 0 it
      gets N % and the newest other deployment (the previous champion) the rest; with 0,
      or with nothing else deployed, it gets everything.
    - An older version (a rollback, or an operator's choice) has served before: it gets
      everything at once. If it is still deployed, only the traffic moves.
    - Whatever ends up without traffic is undeployed, after the split serves.
    """
    ours = sorted((d for d in deployed if d.version_id == target), key=lambda d: -d.share)
    others = [d for d in deployed if d.version_id != target]
    forward = DeployedVersion("", target, 0).rank >= max((d.rank for d in deployed), default=-1)
    key = ours[0].id if ours else "0"
    current = max(others, key=lambda d: (d.rank, d.share, d.id), default=None)
    if forward and canary and current is not None:
        split = {key: canary, current.id: 100 - canary}
    else:
        split = {key: 100}
    undeploy = tuple(d.id for d in deployed if d.id not in split)
    return TrafficPlan(deploy=not ours, split=split, undeploy=undeploy)


_CLAIM_GRACE_SECONDS = 120.0  # a DeployModel request is sent within seconds of its claim


class _RecordChanged(Exception):
    """Another call wrote ``deploy.json`` meanwhile: read it again."""


@dataclass(frozen=True)
class _Target:
    """What one :meth:`VertexEndpoint.deploy` call serves."""

    model: str
    version: str
    vertex_id: str

    def __str__(self) -> str:
        return (
            f"endpoint retrain-{self.model} ({self.model} v{self.version} = "
            f"Vertex version {self.vertex_id})"
        )

    def owns(self, record: Mapping[str, Any]) -> bool:
        return (str(record.get("version")), str(record.get("vertex_version_id"))) == (
            self.version,
            self.vertex_id,
        )


def _age(record: Mapping[str, Any]) -> float:
    """Seconds since the record's ``started_at`` (infinite if it has none)."""
    try:
        started = datetime.fromisoformat(str(record["started_at"]))
    except (KeyError, ValueError):
        return math.inf
    return (datetime.now(UTC) - started).total_seconds()


def _deployed_model_id(operation: Any) -> str | None:
    """The deployed model's id from a finished DeployModel operation, if it says."""
    from google.protobuf import json_format  # noqa: PLC0415

    try:
        response = json_format.MessageToDict(operation.response)
    except (TypeError, ValueError, json_format.Error):
        return None
    found = (response.get("deployedModel") or {}).get("id")
    return str(found) if found else None


class VertexEndpoint:
    """:class:`~serving.registry.Serving` on a Vertex AI endpoint, one per model.

    The endpoint is found by its label ``retrain_model=<model>`` (display name
    ``retrain-<model>``) or created. :meth:`deploy` is idempotent: a redelivered decision
    finds the endpoint as it wants it and changes nothing.

    A deployment takes 10-30 minutes, longer than a Cloud Function may run (540 s). So
    :meth:`deploy` starts the DeployModel operation without blocking on it, keeps it in
    ``registry/<model>/deploy.json`` and waits for it at most ``wait_seconds`` (polling it
    every ``poll_seconds``). Whatever is not finished by then goes on in Vertex AI, and the
    next :meth:`deploy` call (a redelivery, the next promotion, ``retrain promote`` or
    ``rollback``) finishes it: it never sends a second DeployModel for one in flight.

    The record (one per model; deleted once the change is complete)::

        {"version", "vertex_version_id", "endpoint",
         "phase": "starting"      claimed; DeployModel is being sent
                  "deploying"     DeployModel sent: "operation" names it
                  "undeploying"   the new split serves: removing "undeploy", one by one
         "operation": the DeployModel operation (None before it is sent, and when the
                      target was deployed already and only the traffic moved),
         "deployed_model_display_name", "deployed_model_id" (once known),
         "traffic_split": the split requested ("0" = the model being deployed),
         "undeploy": the deployed model ids without traffic in that split,
         "undeploy_operations": {deployed model id: its UndeployModel operation},
         "started_at": ISO 8601, UTC}
    """

    def __init__(
        self,
        settings: Settings,
        registry: VertexRegistry | None = None,
        *,
        wait_seconds: float = 420.0,
        poll_seconds: float = 5.0,
    ) -> None:
        """``wait_seconds``: how long one :meth:`deploy` call waits for the endpoint
        change it started or found (keep it below the function's timeout, 540 s at most,
        with room for the calls around it); ``poll_seconds``: how often it asks."""
        if wait_seconds < 0:
            raise ValueError(f"wait_seconds must be at least 0, not {wait_seconds}")
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, not {poll_seconds}")
        self.settings = settings
        self.registry = registry or VertexRegistry(settings)
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self._where = {"project": settings.project, "location": settings.region}

    def endpoint(self, model: str) -> Any:
        """The model's ``aiplatform.Endpoint``, created if it has none."""
        found = self._find(model)
        if found is None:
            aiplatform().Endpoint.create(
                display_name=f"retrain-{model}",
                labels={**self.settings.gcp.labels, "retrain_model": model},
                sync=True,
                **self._where,
            )
            found = self._find(model)  # if two deployers raced, both take the oldest
        if found is None:
            raise DeployError(f"created endpoint retrain-{model}, but cannot find it by label")
        return aiplatform().Endpoint(found, **self._where)

    def _find(self, model: str) -> str | None:
        endpoints = aiplatform().Endpoint.list(
            filter=f'labels.retrain_model="{model}"', **self._where
        )
        ordered = sorted(endpoints, key=lambda e: (e.create_time, e.resource_name))
        return str(ordered[0].resource_name) if ordered else None

    def _state(self, endpoint: Any, model: str) -> tuple[list[DeployedVersion], dict[str, int]]:
        """The deployed models (fresh from the API) and the traffic split, zeros left out.

        A deployed model whose DeployModel operation has not finished is not listed yet:
        the record in ``deploy.json``, not this list, says that one is in flight."""
        listed = endpoint.list_models()
        split = {str(k): int(v) for k, v in endpoint.gca_resource.traffic_split.items() if v}
        deployed = []
        for item in listed:
            model_id = str(item.model).rsplit("/", 1)[-1].split("@")[0]
            version_id = str(item.model_version_id) if model_id == model else ""
            deployed.append(DeployedVersion(str(item.id), version_id, split.get(str(item.id), 0)))
        return deployed, split

    def deploy(self, model: str, version: str) -> None:
        """Serve ``version`` of ``model`` (see :func:`plan_traffic`).

        Returns once the version serves its share and the versions left without traffic
        are undeployed; or, if that takes longer than ``wait_seconds``, once the change is
        started and recorded (it goes on in Vertex AI; the next call finishes it). First
        finishes a change that an earlier call recorded: one of this version is waited
        for, never started twice. Raises :class:`DeployError` if another version's
        deployment is in flight (the caller retries later) or if the deployment failed.
        Also moves Vertex's ``champion`` alias if it lags behind GCS
        (:meth:`VertexRegistry.sync_champion`)."""
        from google.api_core.exceptions import GoogleAPICallError  # noqa: PLC0415

        deadline = time.monotonic() + self.wait_seconds
        target = _Target(model, version, self.registry.vertex_version(model, version))
        # A promotion that died between the GCS swap and the alias move is finished here, as
        # the redelivered decision deploys it. An alias moved by hand stays for an operator
        # (the next promotion is refused as stale and says so).
        self.registry.sync_champion(model)
        try:
            endpoint = self.endpoint(model)
            for _ in range(5):
                try:
                    if not self._settle(endpoint, target, deadline):
                        return  # this version's change goes on in the background
                    if self._change(endpoint, target, deadline):
                        return
                except _RecordChanged:
                    continue  # another call moved the record on: read it again
        except GoogleAPICallError as exc:
            raise DeployError(f"{target}: {exc}") from exc
        raise DeployError(f"{target}: {self.registry.deploy_uri(model)} keeps changing")

    # -- one change: plan, record, start ---------------------------------------------------

    def _change(self, endpoint: Any, target: _Target, deadline: float) -> bool:
        """Plan from the endpoint's state and make the change; False if another call
        recorded a change first (the caller settles that one and plans again)."""
        spec = self.settings.gcp.endpoint
        deployed, split = self._state(endpoint, target.model)
        plan = plan_traffic(deployed, target.vertex_id, spec.canary_percent)
        if not plan.deploy:
            if plan.split != split:
                endpoint.update(traffic_split=plan.split)  # no operation: it serves at once
            if not plan.undeploy:
                return True
        serving = next(
            (d.id for d in deployed if d.version_id == target.vertex_id and d.id in plan.split),
            None,
        )
        record: dict[str, Any] = {
            "version": target.version,
            "vertex_version_id": target.vertex_id,
            "endpoint": str(endpoint.resource_name),
            "phase": "starting" if plan.deploy else "undeploying",
            "operation": None,
            "deployed_model_display_name": f"{target.model}-v{target.version}",
            "deployed_model_id": None if plan.deploy else serving,
            "traffic_split": plan.split,
            "undeploy": list(plan.undeploy),
            "undeploy_operations": {},
            "started_at": datetime.now(UTC).isoformat(),
        }
        generation = self.registry.write_deploy_record(target.model, record, 0)
        if generation is None:
            return False
        if plan.deploy:
            generation = self._start(endpoint, target, record, generation)
        self._drive(endpoint, target, record, generation, deadline)
        return True

    def _start(
        self, endpoint: Any, target: _Target, record: dict[str, Any], generation: int
    ) -> int:
        """Send DeployModel for the claimed ``record``, without waiting for it, and keep
        its operation in the record; the record's new generation."""
        spec = self.settings.gcp.endpoint
        request = {
            "endpoint": str(endpoint.resource_name),
            "deployed_model": {
                "model": f"{self.registry.vertex_model(target.model)}@{target.vertex_id}",
                "display_name": record["deployed_model_display_name"],
                "dedicated_resources": {
                    "machine_spec": {"machine_type": spec.machine_type},
                    "min_replica_count": spec.min_replica_count,
                    "max_replica_count": spec.max_replica_count,
                },
            },
            # Vertex AI applies the split when the deployment completes ("0": the new one).
            "traffic_split": record["traffic_split"],
        }
        try:
            started = endpoint.api_client.deploy_model(request=request)
        except Exception:
            self.registry.clear_deploy_record(target.model, generation)  # nothing was started
            raise
        record.update(phase="deploying", operation=str(started.operation.name))
        written = self.registry.write_deploy_record(target.model, record, generation)
        if written is None:
            raise DeployError(
                f"{target}: started {record['operation']}, but "
                f"{self.registry.deploy_uri(target.model)} changed meanwhile; check the "
                "endpoint before deploying again"
            )
        log.info("%s: deployment started, operation %s", target, record["operation"])
        return written

    # -- a recorded change: wait for it, finish it -----------------------------------------

    def _settle(self, endpoint: Any, target: _Target, deadline: float) -> bool:
        """Finish the change that an earlier call recorded, if any. True if none is left
        (plan afresh); False if this version's change goes on in the background. Raises
        :class:`DeployError` if another version's deployment is in flight."""
        found = self.registry.deploy_record(target.model)
        if found is None:
            return True
        record, generation = found
        return self._drive(endpoint, target, record, generation, deadline)

    def _drive(
        self,
        endpoint: Any,
        target: _Target,
        record: dict[str, Any],
        generation: int,
        deadline: float,
    ) -> bool:
        """Move ``record`` on as far as it goes by ``deadline``; see :meth:`_settle`."""
        model = target.model
        ours = target.owns(record)
        what = f"v{record.get('version')} (Vertex version {record.get('vertex_version_id')})"
        phase = record.get("phase")
        if phase == "starting":
            age = _age(record)
            if age < _CLAIM_GRACE_SECONDS:
                raise DeployError(
                    f"{target}: another call is starting the deployment of {what} "
                    f"({age:.0f} s ago, {self.registry.deploy_uri(model)}); try again later"
                )
            log.warning(
                "%s: the deployment of %s was claimed %.0f s ago and never started (the "
                "call died); planning afresh", target, what, age,
            )  # fmt: skip
            self._clear(model, generation)
            return True
        if phase == "deploying":
            name = str(record.get("operation"))
            # Another version's deployment is not waited for: this call fails, and is retried.
            operation = self._wait(endpoint, name, deadline if ours else time.monotonic())
            if operation is None:
                log.warning(
                    "%s: Vertex AI no longer knows %s (the deployment of %s); planning "
                    "afresh from the endpoint", target, name, what,
                )  # fmt: skip
                self._clear(model, generation)
                return True
            if not operation.done:
                if not ours:
                    raise DeployError(
                        f"{target}: {what} is still being deployed (operation {name}, "
                        f"started {record.get('started_at')}); deploy again once it is done"
                    )
                log.warning(  # a warning: logged without any logging set up, on stderr
                    "%s: the deployment (operation %s, started %s) goes on in Vertex AI; "
                    "the next deploy() call (a redelivery, the next promotion, or retrain "
                    "promote/rollback) finishes it", target, name, record.get("started_at"),
                )  # fmt: skip
                return False
            if operation.HasField("error"):
                self._clear(model, generation, strict=False)
                failure = (
                    f"the deployment of {what} failed (operation {name}): "
                    f"{operation.error.message} (code {operation.error.code})"
                )
                if ours:
                    raise DeployError(f"{target}: {failure}")
                log.error("%s: %s", target, failure)
                return True
            record.update(phase="undeploying", deployed_model_id=_deployed_model_id(operation))
            generation = self._write(model, record, generation)
            log.info("%s: %s serves (deployed model %s)", target, what, record["deployed_model_id"])
        if record.get("phase") != "undeploying":
            raise DeployError(f"{self.registry.deploy_uri(model)}: unknown phase {phase!r}")
        return self._undeploy(endpoint, target, record, generation, deadline)

    def _undeploy(
        self,
        endpoint: Any,
        target: _Target,
        record: dict[str, Any],
        generation: int,
        deadline: float,
    ) -> bool:
        """Undeploy the record's old deployed models, one at a time, only those still
        without traffic (the new split serves); then delete the record."""
        model = target.model
        ours = target.owns(record)
        running: dict[str, str] = record.setdefault("undeploy_operations", {})
        for deployed_id in record.get("undeploy") or []:
            name = running.get(deployed_id)
            if name is None:
                deployed, serving = self._state(endpoint, model)
                if deployed_id not in {d.id for d in deployed}:
                    continue  # gone already
                if serving.get(deployed_id):
                    log.warning(
                        "%s: deployed model %s takes traffic again (%s); left deployed",
                        target, deployed_id, serving,
                    )  # fmt: skip
                    continue
                started = endpoint.api_client.undeploy_model(
                    request={
                        "endpoint": str(endpoint.resource_name),
                        "deployed_model_id": deployed_id,
                        "traffic_split": serving,
                    }
                )
                name = running[deployed_id] = str(started.operation.name)
                generation = self._write(model, record, generation)
            operation = self._wait(endpoint, name, deadline)
            if operation is None:
                continue  # forgotten by Vertex AI: a later plan undeploys it if it is left
            if not operation.done:
                message = (
                    f"undeploying {deployed_id} (operation {name}), after the deployment of "
                    f"v{record.get('version')}"
                )
                if not ours:
                    raise DeployError(f"{target}: still {message}; try again later")
                log.warning("%s: %s goes on in Vertex AI; the next deploy() call finishes "
                            "it", target, message)  # fmt: skip
                return False
            if operation.HasField("error"):
                self._clear(model, generation, strict=False)  # a later plan undeploys it
                raise DeployError(
                    f"{target}: undeploying {deployed_id} (operation {name}) failed: "
                    f"{operation.error.message} (code {operation.error.code})"
                )
        self._clear(model, generation)
        return True

    def _wait(self, endpoint: Any, name: str, deadline: float) -> Any | None:
        """The operation ``name`` once it is done, or as it is at ``deadline`` (asked at
        least once); None if Vertex AI does not know it (any more)."""
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        while True:
            try:
                operation = endpoint.api_client.get_operation({"name": name})
            except NotFound:
                return None
            remaining = deadline - time.monotonic()
            if operation.done or remaining <= 0:
                return operation
            time.sleep(min(self.poll_seconds, remaining))

    def _write(self, model: str, record: dict[str, Any], generation: int) -> int:
        written = self.registry.write_deploy_record(model, record, generation)
        if written is None:
            raise _RecordChanged
        return written

    def _clear(self, model: str, generation: int, strict: bool = True) -> None:
        """Delete the record; unless it was changed meanwhile (raises if ``strict``)."""
        if not self.registry.clear_deploy_record(model, generation) and strict:
            raise _RecordChanged
