"""Point the real aiplatform SDK at a local fake, in a fresh global config per test."""

from __future__ import annotations

import pytest

from retrain.vertex_sdk import aiplatform

__all__ = ["use_fake"]


def use_fake(monkeypatch: pytest.MonkeyPatch, url: str, project: str, location: str) -> None:
    """Over REST, anonymously; ``monkeypatch`` restores the SDK's global config after."""
    from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415

    initializer = aiplatform("initializer")
    monkeypatch.setattr(initializer, "global_config", initializer._Config())
    initializer.global_config.init(
        project=project,
        location=location,
        api_endpoint=url,
        api_transport="rest",
        credentials=AnonymousCredentials(),
    )
