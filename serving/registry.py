"""The ``ModelRegistry`` port and its GCS-backed adapter (the local default).

Layout in the artifacts bucket::

    registry/<model>/champion.json          {"version": "3"}   (moved with generation preconditions)
    registry/<model>/versions/<version>.json {"version", "artifact_uri", "metrics", "run_id", ...}

    registry/<model>/by-run/<run id>.json    {"version"}: one version per run, however often
                                             its report is delivered
    registry/<model>/audit/<time>-<action>.json  who moved the champion, when and why

:class:`GcsRegistry` reads (the prediction server, the evaluate step);
:class:`GcsRegistryWriter` also registers and promotes (the gatekeeper, operators).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from retrain import blobstore

if TYPE_CHECKING:
    from retrain.config import Settings

__all__ = [
    "GcsRegistry",
    "GcsRegistryWriter",
    "ModelRegistry",
    "ModelVersion",
    "RegistryError",
    "Serving",
    "registry_writer",
    "serving_for",
]


class RegistryError(RuntimeError):
    """The registry's objects are missing or malformed; the message names the object."""


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    artifact_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


class ModelRegistry(Protocol):
    def champion(self, model: str) -> ModelVersion | None:
        """The version that the ``champion`` alias points at, or None for a new model."""
        ...

    def version(self, model: str, version: str) -> ModelVersion | None:
        """One registered version, or None if there is no such version."""
        ...


class Serving(Protocol):
    """Puts the champion in front of callers once the registry has moved it.

    Locally there is no adapter: the prediction server follows the ``model-decisions``
    topic and the champion pointer by itself. On Vertex AI the gatekeeper (and
    ``retrain promote`` / ``rollback``) call :meth:`deploy` after a promotion.
    """

    def deploy(self, model: str, version: str) -> None:
        """Serve ``version`` of ``model``; idempotent, so a redelivered decision may call it
        again. Returns once the version serves its traffic share, or once the adapter's
        bounded wait is over: a deploy still under way is then finished by the next call."""
        ...


class GcsRegistry:
    def __init__(self, bucket: str, client: Any | None = None, prefix: str = "registry") -> None:
        self.root = f"gs://{bucket}/{prefix}"
        self._client = client

    def champion_uri(self, model: str) -> str:
        return f"{self.root}/{model}/champion.json"

    def version_uri(self, model: str, version: str) -> str:
        return f"{self.root}/{model}/versions/{version}.json"

    def _read(self, uri: str) -> dict[str, Any] | None:
        data = blobstore.read_bytes(uri, self._client)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise RegistryError(f"{uri}: not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise RegistryError(f"{uri}: expected a JSON object")
        return value

    def champion(self, model: str) -> ModelVersion | None:
        pointer = self._read(self.champion_uri(model))
        if pointer is None:
            return None
        version = pointer.get("version")
        if not isinstance(version, str):
            raise RegistryError(f"{self.champion_uri(model)}: 'version' is not a string")
        found = self.version(model, version)
        if found is None:
            raise RegistryError(
                f"{self.champion_uri(model)} names version {version}, "
                f"but {self.version_uri(model, version)} does not exist"
            )
        return found

    def version(self, model: str, version: str) -> ModelVersion | None:
        """One registered version, or None if there is no such version."""
        record = self._read(self.version_uri(model, version))
        if record is None:
            return None
        try:
            return ModelVersion(
                model=model,
                version=version,
                artifact_uri=str(record["artifact_uri"]),
                metrics={k: float(v) for k, v in record.get("metrics", {}).items()},
                run_id=record.get("run_id"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"{self.version_uri(model, version)}: malformed: {exc!r}") from exc


class GcsRegistryWriter(GcsRegistry):
    """The write side: versions, verdicts, and the ``champion`` alias moved by
    compare-and-swap (a generation precondition on ``champion.json``)."""

    def _bucket(self) -> Any:
        from google.cloud import storage  # noqa: PLC0415

        if self._client is None:
            self._client = storage.Client()
        bucket, _ = blobstore.split_uri(self.root)
        return self._client.bucket(bucket)

    def _name(self, uri: str) -> str:
        return blobstore.split_uri(uri)[1]

    def _create(self, uri: str, value: dict[str, Any]) -> bool:
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        try:
            self._bucket().blob(self._name(uri)).upload_from_string(
                json.dumps(value, indent=2), content_type="application/json", if_generation_match=0
            )
        except PreconditionFailed:
            return False
        return True

    def _read_gen(self, uri: str) -> tuple[dict[str, Any], int] | None:
        from google.api_core.exceptions import NotFound  # noqa: PLC0415

        blob = self._bucket().blob(self._name(uri))
        try:
            data = blob.download_as_bytes()
        except NotFound:
            return None
        return json.loads(data), int(blob.generation)

    def _update(self, uri: str, **fields: Any) -> dict[str, Any]:
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        for _ in range(10):
            found = self._read_gen(uri)
            if found is None:
                raise RegistryError(f"{uri} does not exist")
            value, generation = found
            value.update(fields)
            try:
                self._bucket().blob(self._name(uri)).upload_from_string(
                    json.dumps(value, indent=2),
                    content_type="application/json",
                    if_generation_match=generation,
                )
            except PreconditionFailed:
                continue
            return value
        raise RegistryError(f"{uri} keeps changing; gave up updating it")

    def records(self, model: str) -> list[dict[str, Any]]:
        """Every version's record, oldest first."""
        prefix = self._name(f"{self.root}/{model}/versions/")
        blobs = self._bucket().client.list_blobs(self._bucket().name, prefix=prefix)
        values = [json.loads(blob.download_as_bytes()) for blob in blobs]
        return sorted(values, key=lambda v: int(v["version"]))

    def champion_pointer(self, model: str) -> tuple[dict[str, Any], int] | None:
        return self._read_gen(self.champion_uri(model))

    def register(self, model: str, record: dict[str, Any]) -> tuple[str, bool]:
        """A new version for ``record["run_id"]``, or the one it already has (idempotent)."""
        run_uri = f"{self.root}/{model}/by-run/{record['run_id']}.json"
        if (known := self._read(run_uri)) is not None:
            return str(known["version"]), False
        number = max((int(v["version"]) for v in self.records(model)), default=0) + 1
        while not self._create(
            self.version_uri(model, str(number)), {**record, "version": str(number)}
        ):
            number += 1  # taken by a concurrent registration: the next one
        if self._create(run_uri, {"version": str(number)}):
            return str(number), True
        # The same run was registered concurrently (a duplicate delivery): keep theirs.
        self._bucket().blob(self._name(self.version_uri(model, str(number)))).delete()
        winner = self._read(run_uri)
        assert winner is not None  # noqa: S101 (the create just failed because it exists)
        return str(winner["version"]), False

    def record_verdict(self, model: str, version: str, **fields: Any) -> None:
        self._update(self.version_uri(model, version), **fields)

    def promote(self, model: str, version: str, expected: str | None, by: str, reason: str) -> bool:
        """Make ``version`` the champion only if the champion is still ``expected``."""
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        if self.version(model, version) is None:
            raise RegistryError(f"{model} has no version {version}")
        found = self.champion_pointer(model)
        current = found[0].get("version") if found else None
        if current != expected:
            return False
        history = ([current] if current else []) + (found[0].get("previous", []) if found else [])
        pointer = {
            "version": version,
            "previous": history[:50],
            "by": by,
            "reason": reason,
            "at": time.time(),
        }
        try:
            self._bucket().blob(self._name(self.champion_uri(model))).upload_from_string(
                json.dumps(pointer, indent=2),
                content_type="application/json",
                if_generation_match=found[1] if found else 0,
            )
        except PreconditionFailed:
            return False  # moved by someone else in between: the caller re-reads
        self._create(
            f"{self.root}/{model}/audit/{time.time_ns()}-promote.json",
            {"action": "promote", "from": current, "to": version, "by": by, "reason": reason,
             "at": pointer["at"]},
        )  # fmt: skip
        return True

    def decision(self, model: str, run_id: str) -> dict[str, Any] | None:
        return self._read(f"{self.root}/{model}/decisions/{run_id}.json")

    def record_decision(self, model: str, run_id: str, decision: dict[str, Any]) -> bool:
        """Keep the gatekeeper's decision on a run, once; False if it was already kept."""
        return self._create(f"{self.root}/{model}/decisions/{run_id}.json", decision)

    def mark_published(self, model: str, run_id: str, message_id: str) -> None:
        self._update(f"{self.root}/{model}/decisions/{run_id}.json", message_id=message_id)

    def decisions(self, model: str) -> list[dict[str, Any]]:
        prefix = self._name(f"{self.root}/{model}/decisions/")
        blobs = self._bucket().client.list_blobs(self._bucket().name, prefix=prefix)
        values = [json.loads(blob.download_as_bytes()) for blob in blobs]
        return sorted(values, key=lambda v: str(v.get("time", "")))


def registry_writer(settings: Settings, client: Any | None = None) -> GcsRegistryWriter:
    """The registry that ``backend`` names: Vertex AI Model Registry for ``vertex``; the
    GCS registry for ``local`` and ``kfp`` (KFP on GKE has no model registry of its own)."""
    if settings.backend == "vertex":
        from serving.vertex import VertexRegistry  # noqa: PLC0415 (aiplatform is slow)

        return VertexRegistry(settings, client)
    return GcsRegistryWriter(settings.buckets.artifacts, client)


def serving_for(
    settings: Settings, registry: GcsRegistryWriter, wait_seconds: float | None = None
) -> Serving | None:
    """Vertex AI endpoints for ``vertex`` (which read versions from ``registry``, the one
    :func:`registry_writer` gave; a deploy is waited for ``wait_seconds``, by default
    ``gcp.endpoint.deploy_wait_seconds``); otherwise our prediction server, which follows the
    decisions topic by itself and needs no call."""
    if settings.backend == "vertex":
        from serving.vertex import VertexEndpoint, VertexRegistry  # noqa: PLC0415

        if not isinstance(registry, VertexRegistry):
            raise TypeError("backend vertex serves from the Vertex registry; see registry_writer")
        wait = settings.gcp.endpoint.deploy_wait_seconds if wait_seconds is None else wait_seconds
        return VertexEndpoint(settings, registry, wait_seconds=wait)
    return None
