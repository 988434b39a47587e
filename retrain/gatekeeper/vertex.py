"""The Vertex AI Model Registry projection of the registry (``backend: vertex``).

Where the truth lives:

- **Firestore** keeps what it keeps for every backend (see
  :mod:`retrain.gatekeeper.registry`): every version's record with its exact metrics,
  lineage and verdict, the decisions, the audit trail, and the champion pointer, whose
  commits are *the* lock of every promotion. :meth:`VertexRegistry.champion` and
  :meth:`~VertexRegistry.version` read Firestore, so the prediction server, the evaluate
  step and the gatekeeper need neither the 2.4 s import of ``google-cloud-aiplatform``
  nor a Vertex AI call to read the champion.
- **Vertex AI Model Registry** is what people see: one model per retrain model (resource
  id = the model name), one version per run, labelled with the run, the request and the
  metrics, and the ``champion`` and ``default`` aliases on the champion. It is a
  projection that :meth:`VertexRegistry.project` moves *after* the decision's commit.
  The two are joined by ``vertex_version_id`` in each version record, and by the
  ``retrain_version`` / ``retrain_run`` labels on each Vertex version.

Documents added to the registry::

    registry/<model>/vertex/sync     the last champion alias move that completed:
                                     {"version", "vertex_version_id", "at"}
    registry/<model>/vertex/deploy   the endpoint change that
                                     :meth:`serving.vertex_endpoint.VertexEndpoint.deploy`
                                     started and has not finished; deleted when done

``sync`` tells "Vertex lags behind Firestore" (a promotion died between the commit and
the alias move: safe to finish) from "someone moved the alias in the console" (not ours
to overwrite: the promotion is refused as stale).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from retrain.gatekeeper.registry import FirestoreRegistry, RegistryError
from retrain.statedb import Change, Database, Doc, retrying
from retrain.vertex_sdk import aiplatform, label_value

if TYPE_CHECKING:
    from retrain.config import Settings

__all__ = ["CHAMPION_ALIAS", "VertexRegistry"]

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
_DEFAULT_ALIAS = "default"  # the version used when none is named; Vertex keeps exactly one
_PREDICT_ROUTE, _HEALTH_ROUTE, _HTTP_PORT = "/predict", "/health", 8080  # the serving image's
_MAX_LABELS = 64
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_NOT_LABEL = re.compile(r"[^a-z0-9_-]")


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


class VertexRegistry(FirestoreRegistry):
    """The Firestore registry whose versions and ``champion`` alias also live in Vertex AI
    Model Registry (see the module docstring for which side holds what).

    ``storage`` is a ``google.cloud.storage.Client`` for the registry bucket; the Vertex AI
    SDK uses its global configuration (``aiplatform.init``) for credentials and endpoint,
    and ``settings.project`` / ``settings.region`` for every resource.
    """

    def __init__(self, settings: Settings, db: Database, storage: Any | None = None) -> None:
        super().__init__(db, settings.buckets.models, storage)
        self.settings = settings
        self._where = {"project": settings.project, "location": settings.region}

    # -- names -------------------------------------------------------------------------

    def vertex_model(self, model: str) -> str:
        """The model's resource name (its id is the model name, fixed at the first upload)."""
        return f"projects/{self.settings.project}/locations/{self.settings.region}/models/{model}"

    def _vertex_doc(self, model: str, name: str) -> Doc:
        return self.db.read_path("registry", model, "vertex", name)

    # -- the endpoint change under way (used by VertexEndpoint) -------------------------

    def deploy_uri(self, model: str) -> str:
        """The record's name, for messages."""
        return self.where(model, "vertex", "deploy")

    def deploy_record(self, model: str) -> tuple[dict[str, Any], int] | None:
        """The endpoint change under way and its generation, or None if there is none."""
        found = self._vertex_doc(model, "deploy")
        if found.data is None:
            return None
        value = dict(found.data)
        generation = int(value.pop("generation", 1))
        return value, generation

    def write_deploy_record(self, model: str, value: dict[str, Any], generation: int) -> int | None:
        """Write the record if its generation is still ``generation`` (0: only if there is
        none); its new generation, or None if another call wrote or removed it first."""
        from retrain.statedb import Conflict  # noqa: PLC0415

        found = self._vertex_doc(model, "deploy")
        now = int(found.get("generation", 1)) if found.exists else 0
        if now != generation:
            return None
        change = Change()
        change.put(found, {**value, "generation": generation + 1})
        try:
            self.db.commit(change)
        except Conflict:
            return None
        return generation + 1

    def clear_deploy_record(self, model: str, generation: int) -> bool:
        """Delete the record if its generation is still ``generation``."""
        from retrain.statedb import Conflict  # noqa: PLC0415

        found = self._vertex_doc(model, "deploy")
        if not found.exists or int(found.get("generation", 1)) != generation:
            return False
        change = Change()
        change.delete(found)
        try:
            self.db.commit(change)
        except Conflict:
            return False
        return True

    # -- register ----------------------------------------------------------------------

    def register(self, model: str, record: dict[str, Any]) -> str:
        """A version for ``record["run_id"]``, in Firestore and in Vertex AI, once.

        Firestore first: its commit settles which delivery of a report owns the version
        number. Then :meth:`vertex_version` uploads it, unless an earlier delivery did.
        """
        version = super().register(model, record)
        self.vertex_version(model, version)
        return version

    def vertex_version(self, model: str, version: str) -> str:
        """The Vertex version id joined to ``version``; uploads the version if it has none.

        A redelivery that finds the id in the version record uploads nothing. One that died
        after the upload and before it kept the id finds the upload by its run label.
        Two concurrent deliveries may both upload: the first to keep its id wins, the
        other deletes its own upload.
        """
        record = self.version_doc(model, version).data
        if record is None:
            raise RegistryError(f"{model} has no version {version}")
        if record.get("vertex_version_id"):
            return str(record["vertex_version_id"])
        run_id = record.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            where = self.where(model, "versions", version)
            raise RegistryError(f"{where}: no run_id to upload it by")
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

        def attempt() -> str:
            found = self.version_doc(model, version)
            if found.data is None:
                raise RegistryError(f"{self.where(model, 'versions', version)} disappeared")
            kept = found.get("vertex_version_id")
            if kept:
                if str(kept) != vertex_id and uploaded:
                    # A concurrent delivery uploaded the same run and kept its id first.
                    registry = aiplatform().models.ModelRegistry(
                        self.vertex_model(model), **self._where
                    )
                    registry.delete_version(vertex_id)
                return str(kept)
            change = Change()
            change.put(found, {"vertex_model": self.vertex_model(model),
                               "vertex_version_id": vertex_id})  # fmt: skip
            self.db.commit(change)
            return vertex_id

        return retrying(attempt, f"keep the Vertex version id of {model} v{version}")

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
        kept = self.version_doc(model, version).get("vertex_version_id")
        return str(kept) if kept else None

    def _synced_id(self, model: str) -> str | None:
        """The Vertex id of the last alias move that completed, or None."""
        kept = self._vertex_doc(model, "sync").get("vertex_version_id")
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

    def project(self, model: str) -> None:
        """Move ``champion`` and ``default`` to the Firestore champion, until it holds still.

        Two promotions that follow each other may move the alias in the wrong order; each
        re-reads the pointer after its move, so the later one puts it right.
        """
        from google.api_core.exceptions import GoogleAPICallError  # noqa: PLC0415

        registry = aiplatform().models.ModelRegistry(self.vertex_model(model), **self._where)
        for _ in range(10):
            version = self.pointer(model).version
            if version is None:
                return
            vertex_id = self.vertex_version(model, version)
            try:
                # Vertex moves an alias that another version holds: no separate removal.
                registry.add_version_aliases([CHAMPION_ALIAS, _DEFAULT_ALIAS], version=vertex_id)
            except GoogleAPICallError as exc:
                raise RegistryError(
                    f"{model} v{version} is the champion, but moving the Vertex alias "
                    f"to {self.vertex_model(model)}@{vertex_id} failed (a redelivery or "
                    f"`sync_champion` finishes it): {exc}"
                ) from exc
            self._keep_sync(model, version, vertex_id)
            if self.pointer(model).version == version:
                return
        raise RegistryError(f"{self.where(model)} keeps moving; gave up following it")

    def _keep_sync(self, model: str, version: str, vertex_id: str) -> None:
        def attempt() -> None:
            found = self._vertex_doc(model, "sync")
            change = Change()
            change.put(found, {"version": version, "vertex_version_id": vertex_id,
                               "at": time.time()})  # fmt: skip
            self.db.commit(change)

        retrying(attempt, f"keep the alias move of {model}")

    def veto(self, model: str, current: str | None, target: str) -> str | None:
        """Why ``target`` must not replace ``current``: Vertex's ``champion`` alias was moved
        by hand to another version (uploads ``target`` if it has no Vertex version yet)."""
        vertex_id = self.vertex_version(model, target)
        if self._vertex_agrees(model, current, vertex_id):
            return None
        ours = f"v{current}'s" if current else "none (no champion yet)"
        return (
            f"stale: Vertex AI's {CHAMPION_ALIAS} alias of {self.vertex_model(model)} is on "
            f"version {self._alias_holder(model)}, not {ours} (moved by hand?); adopt "
            "it with `retrain promote` or move it back: FAIL"
        )

    def _refuse_vetoed(self, model: str, target: str) -> None:
        veto = self.veto(model, self.pointer(model).version, target)
        if veto is not None:
            raise RegistryError(f"{model}: {veto.removesuffix(': FAIL')}")

    def promote(
        self, model: str, version: str, expected_generation: int, by: str, reason: str
    ) -> bool:
        """Make ``version`` the champion by hand (compare-and-swap on the pointer's
        generation); then move the alias. :class:`RegistryError` if someone moved Vertex's
        alias by hand to another version (promoting that version adopts it)."""
        self._refuse_vetoed(model, version)
        if not super().promote(model, version, expected_generation, by, reason):
            return False
        self.project(model)
        return True

    def rollback(
        self, model: str, expected_generation: int, by: str, reason: str, to: str | None = None
    ) -> str | None:
        """As :meth:`FirestoreRegistry.rollback`, then move the alias; refused like
        :meth:`promote` if the alias was moved by hand."""
        head = self.head_doc(model)
        if int(head.get("generation", 0)) != expected_generation:
            return None  # moved meanwhile: nothing to ask Vertex AI
        self._refuse_vetoed(model, self.rollback_target(model, head, to))
        moved = super().rollback(model, expected_generation, by, reason, to)
        if moved is not None:
            self.project(model)
        return moved

    def sync_champion(self, model: str) -> bool:
        """Finish a promotion that died between the commit and the alias move.

        True if Vertex's ``champion`` alias now names the champion (or there is none);
        False if someone moved the alias by hand, which is left alone for an operator.
        """
        version = self.pointer(model).version
        if version is None:
            return True
        target = self.vertex_version(model, version)
        holder = self._alias_holder(model)
        if holder == target:
            return True
        if holder is not None and holder != self._synced_id(model):
            return False
        self.project(model)
        return True
