"""The coalescing window is counted from when the run took the lease, not from when its
worker got round to waiting (retrain.data_objects.window_left)."""

from __future__ import annotations

import pytest

from retrain.data_objects import window_left


@pytest.mark.parametrize(
    ("since", "now", "left"),
    [
        (None, 100.0, 2.0),  # unknown opening: the whole window
        (100.0, 100.0, 2.0),  # the worker waits at once
        (100.0, 100.5, 1.5),  # it took half a second to start: the rest
        (100.0, 102.0, 0.0),  # it started after the window: no wait
        (100.0, 130.0, 0.0),
        (105.0, 100.0, 2.0),  # a clock behind the lease's: never more than the window
    ],
)
def test_window_left(since: float | None, now: float, left: float) -> None:
    assert window_left(2.0, since, now) == pytest.approx(left)
