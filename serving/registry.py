"""The ``ModelRegistry`` port and its GCS-backed adapter (the local default).

Layout in the artifacts bucket::

    registry/<model>/champion.json          {"version": "3"}   (moved with generation preconditions)
    registry/<model>/versions/<version>.json {"version", "artifact_uri", "metrics", "run_id", ...}

Until the gatekeeper lands, only reading the champion is implemented; registering and
promoting arrive with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from retrain import blobstore

__all__ = ["GcsRegistry", "ModelRegistry", "ModelVersion", "RegistryError"]


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
