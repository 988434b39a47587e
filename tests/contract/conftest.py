"""The launchers' contract tests share a model per test and a ledger on a standing clock."""

from __future__ import annotations

import pytest

from retrain.ledger import FirestoreLedger
from retrain.statedb import Database
from tests.conftest import unique


class Clock:
    """A ledger clock that stands still, so that lease times can be compared exactly."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def model() -> str:
    """A model of its own per test: its ledger documents are seen by no other test."""
    return unique("m")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(db: Database, clock: Clock) -> FirestoreLedger:
    return FirestoreLedger(db, clock=clock)
