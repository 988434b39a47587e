"""The gatekeeper: gate policy, decisions, and the model registry with its adapters.

- :mod:`~retrain.gatekeeper.policy`: is a candidate good enough (every rule with its numbers);
- :mod:`~retrain.gatekeeper.canary`: does a canary complete or roll back on its live metric;
- :mod:`~retrain.gatekeeper.decisions`: a report becomes one decision, in one commit;
- :mod:`~retrain.gatekeeper.registry`: the ``ModelRegistry`` port and its Firestore adapter;
- :mod:`~retrain.gatekeeper.vertex`: its projection onto Vertex AI Model Registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retrain.gatekeeper.registry import (
    FirestoreRegistry,
    ModelRegistry,
    ModelVersion,
    RegistryError,
)

if TYPE_CHECKING:
    from retrain.config import Settings
    from retrain.statedb import Database

__all__ = [
    "FirestoreRegistry",
    "ModelRegistry",
    "ModelVersion",
    "RegistryError",
    "registry_for",
]


def registry_for(settings: Settings, db: Database, storage: Any | None = None) -> FirestoreRegistry:
    """The registry that ``backend`` names: Firestore, projected onto Vertex AI Model
    Registry for ``vertex`` (KFP on GKE and the local stack have no registry of their own).
    ``storage`` is the client of the registry bucket (default: made on first use)."""
    if settings.backend == "vertex":
        from retrain.gatekeeper.vertex import VertexRegistry  # noqa: PLC0415 (aiplatform)

        return VertexRegistry(settings, db, storage)
    return FirestoreRegistry(db, settings.buckets.models, storage)
