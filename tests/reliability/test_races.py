"""Race stress in the test tier: each scenario of tests/reliability/races.py, 20 trials.

``make bench`` runs 200 trials of each (bench/test_reliability.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.reliability.races import SCENARIOS, trial
from tests.reliability.world import World

pytestmark = pytest.mark.integration

TRIALS = 20


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_races_keep_the_invariants(name: str, make_world: Callable[..., World]) -> None:
    for _ in range(TRIALS):
        trial(make_world, name)
