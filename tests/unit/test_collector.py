"""The serving processes' garbage-collector settings (serving.collector)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from serving.collector import YOUNG_THRESHOLD, freeze_heap


@pytest.fixture
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector")
def test_freeze_heap_hides_the_start_and_lets_a_large_request_pass_uncollected() -> None:
    frozen = gc.get_freeze_count()
    freeze_heap()
    assert gc.get_freeze_count() > frozen
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    collections = gc.get_stats()[0]["collections"]
    request = [[float(i)] * 8 for i in range(1_000)]  # a 1,000-row request's instances
    assert gc.get_stats()[0]["collections"] == collections
    assert len(request) == 1_000
