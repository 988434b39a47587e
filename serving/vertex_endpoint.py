"""The ``Serving`` port and its Vertex AI endpoint adapter (``backend: vertex``).

Locally there is no adapter: the prediction server follows the ``model-decisions`` topic
and the champion pointer by itself. On Vertex AI the gatekeeper (and ``retrain promote`` /
``rollback``) call :meth:`VertexEndpoint.deploy` after a promotion; the change under way
is kept next to the registry (:class:`~retrain.gatekeeper.vertex.VertexRegistry`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from retrain.gatekeeper.vertex import VertexRegistry
from retrain.vertex_sdk import aiplatform

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.gatekeeper.registry import FirestoreRegistry

__all__ = [
    "DeployError",
    "DeployedVersion",
    "Serving",
    "TrafficPlan",
    "VertexEndpoint",
    "plan_traffic",
    "serving_for",
]

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """The endpoint is not in the state a deployment expects; the message names it."""


class Serving(Protocol):
    """Puts the champion in front of callers once the registry has moved it."""

    def deploy(self, model: str, version: str, share: int | None = None) -> None:
        """Serve ``version`` of ``model``; idempotent, so a redelivered decision may call it
        again. Returns once the version serves its traffic share, or once the adapter's
        bounded wait is over: a deploy still under way is then finished by the next call.

        ``share``: the new version's traffic percentage beside the previous champion (a
        canary, 1-99), or 0 for all of it; None: the adapter's own setting
        (``gcp.endpoint.canary_percent``). An older version always gets all of it."""
        ...


def serving_for(
    settings: Settings, registry: FirestoreRegistry, wait_seconds: float | None = None
) -> Serving | None:
    """Vertex AI endpoints for ``vertex`` (which read versions from ``registry``, a
    :class:`VertexRegistry`; a deploy is waited for ``wait_seconds``, by default
    ``gcp.endpoint.deploy_wait_seconds``); otherwise our prediction server, which follows the
    decisions topic by itself and needs no call."""
    if settings.backend != "vertex":
        return None
    if not isinstance(registry, VertexRegistry):
        raise TypeError("backend vertex serves from the Vertex registry; see registry_for")
    wait = settings.gcp.endpoint.deploy_wait_seconds if wait_seconds is None else wait_seconds
    return VertexEndpoint(settings, registry, wait_seconds=wait)


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
    """Another call wrote the deploy record meanwhile: read it again."""


@dataclass(frozen=True)
class _Target:
    """What one :meth:`VertexEndpoint.deploy` call serves."""

    model: str
    version: str
    vertex_id: str
    share: int | None = None  # None: gcp.endpoint.canary_percent

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
    """:class:`Serving` on a Vertex AI endpoint, one per model.

    The endpoint is found by its label ``retrain_model=<model>`` (display name
    ``retrain-<model>``) or created. :meth:`deploy` is idempotent: a redelivered decision
    finds the endpoint as it wants it and changes nothing.

    A deployment takes 10-30 minutes, longer than a Cloud Function may run (540 s). So
    :meth:`deploy` starts the DeployModel operation without blocking on it, keeps it in
    ``registry/<model>/vertex/deploy`` and waits for it at most ``wait_seconds`` (polling it
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
        registry: VertexRegistry,
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
        self.registry = registry
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
                **self._logging(model),
                **self._where,
            )
            found = self._find(model)  # if two deployers raced, both take the oldest
        if found is None:
            raise DeployError(f"created endpoint retrain-{model}, but cannot find it by label")
        return aiplatform().Endpoint(found, **self._where)

    def _logging(self, model: str) -> dict[str, Any]:
        """The endpoint's request-response logging, as ``Endpoint.create`` takes it: a
        sample of ``models.<m>.serving.log_sample_rate`` of the requests and responses, to
        ``gcp.endpoint.request_response_logging_table`` (or the table Vertex AI makes).

        Vertex AI logs what it receives and answers, to BigQuery; our own prediction
        server logs to the artifacts bucket (retrain/predictions.py), with the version
        that answered. Set when the endpoint is created only: an existing endpoint keeps
        its logging (change it in the console or with ``gcloud ai endpoints update``)."""
        rate = self.settings.models[model].serving.log_sample_rate
        if rate <= 0:
            return {}
        return {
            "enable_request_response_logging": True,
            "request_response_logging_sampling_rate": rate,
            "request_response_logging_bq_destination_table": (
                self.settings.gcp.endpoint.request_response_logging_table
            ),
        }

    def _find(self, model: str) -> str | None:
        endpoints = aiplatform().Endpoint.list(
            filter=f'labels.retrain_model="{model}"', **self._where
        )
        ordered = sorted(endpoints, key=lambda e: (e.create_time, e.resource_name))
        return str(ordered[0].resource_name) if ordered else None

    def _state(self, endpoint: Any, model: str) -> tuple[list[DeployedVersion], dict[str, int]]:
        """The deployed models (fresh from the API) and the traffic split, zeros left out.

        A deployed model whose DeployModel operation has not finished is not listed yet:
        the deploy record, not this list, says that one is in flight."""
        listed = endpoint.list_models()
        split = {str(k): int(v) for k, v in endpoint.gca_resource.traffic_split.items() if v}
        deployed = []
        for item in listed:
            model_id = str(item.model).rsplit("/", 1)[-1].split("@")[0]
            version_id = str(item.model_version_id) if model_id == model else ""
            deployed.append(DeployedVersion(str(item.id), version_id, split.get(str(item.id), 0)))
        return deployed, split

    def deploy(self, model: str, version: str, share: int | None = None) -> None:
        """Serve ``version`` of ``model`` (see :func:`plan_traffic`), at ``share`` percent
        of the traffic beside the previous champion (0: all of it; None:
        ``gcp.endpoint.canary_percent``; a canary's share is ``gate.canary.percent``).

        Returns once the version serves its share and the versions left without traffic
        are undeployed; or, if that takes longer than ``wait_seconds``, once the change is
        started and recorded (it goes on in Vertex AI; the next call finishes it). First
        finishes a change that an earlier call recorded: one of this version is waited
        for, never started twice. Raises :class:`DeployError` if another version's
        deployment is in flight (the caller retries later) or if the deployment failed.
        Also moves Vertex's ``champion`` alias if it lags behind the registry
        (:meth:`VertexRegistry.sync_champion`)."""
        from google.api_core.exceptions import GoogleAPICallError  # noqa: PLC0415

        deadline = time.monotonic() + self.wait_seconds
        if share is not None and not 0 <= share <= 99:
            raise ValueError(f"share must be 0 (all traffic) to 99 percent, not {share}")
        target = _Target(model, version, self.registry.vertex_version(model, version), share)
        # A promotion that died between its commit and the alias move is finished here, as
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
        share = spec.canary_percent if target.share is None else target.share
        plan = plan_traffic(deployed, target.vertex_id, share)
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
