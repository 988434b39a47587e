"""Fixtures of the reliability tier: the session stack's Firestore and storage emulators."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from retrain.config import Settings
from retrain.localstack import Stack, emulators
from tests.reliability.world import ROUTE, Faults, Plan, World, counted_storage


@pytest.fixture(scope="module")
def firestore_client(stack: Stack) -> Any:
    settings = stack.settings
    return emulators.firestore_client(stack.firestore_host, settings.project, settings.database)


@pytest.fixture(scope="module")
def storage(stack: Stack) -> Any:
    return emulators.storage_client(stack.gcs_url, stack.settings.project)


@pytest.fixture
def emulated(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The clients made without an explicit address (data window, reports) find the stack's
    emulators, as in a function of the stack."""
    for name, value in stack.env().items():
        if name.endswith("_EMULATOR_HOST"):
            monkeypatch.setenv(name, value)
    return stack.settings


@pytest.fixture
def make_world(
    emulated: Settings, firestore_client: Any, storage: Any
) -> Iterator[Callable[..., World]]:
    """Worlds of one fresh model each; objects written or copied count as writes."""
    made: list[Faults] = []

    def make(faults: Faults | None = None, plan: Plan | None = None, **kwargs: Any) -> World:
        world = World(emulated, firestore_client, storage, faults, plan, **kwargs)
        made.append(world.faults)
        return world

    with counted_storage(_Shared(made)):
        yield make


class _Shared(Faults):
    """Routes each storage write to the faults of the world that is writing: the one the
    thread made, else the newest (the threads of a race share their world)."""

    def __init__(self, made: list[Faults]) -> None:
        super().__init__()
        self.made = made

    def write(self, what: str, apply: Callable[[], Any]) -> Any:
        faults: Faults | None = getattr(ROUTE, "faults", None) or (
            self.made[-1] if self.made else None
        )
        return apply() if faults is None else faults.write(what, apply)
