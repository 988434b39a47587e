"""The batcher alone: slots, the window, errors (an estimator that records its calls)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pytest

from retrain.gatekeeper.registry import ModelVersion
from serving.batching import Batcher, predict_threads
from serving.models import LoadedModel

pytestmark = pytest.mark.unit


class Recording:
    """predict_proba = the first column, recorded; held while ``hold`` is clear."""

    classes_ = np.array([0, 1])

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.inside = threading.Semaphore(0)
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False

    def predict_proba(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        self.inside.release()
        assert self.hold.wait(30)
        if self.fail:
            raise RuntimeError("the estimator failed")
        self.calls.append(len(x))
        return np.column_stack([1 - x[:, 0], x[:, 0]])


def loaded(estimator: Recording) -> LoadedModel:
    return LoadedModel(ModelVersion("m", "1", "x"), estimator, ("a",), "y", (0, 1), False,
                       datetime.now(UTC))  # fmt: skip


def rows(*values: float) -> npt.NDArray[np.float64]:
    return np.array([[v] for v in values])


def test_an_idle_batcher_never_waits_for_the_window() -> None:
    estimator = Recording()
    model = loaded(estimator)
    batcher = Batcher(predict_threads(1), window=3600.0)

    async def scenario() -> None:
        for value in (0.1, 0.2, 0.3):  # one after another: each finds the batcher idle
            got = await asyncio.wait_for(batcher.probabilities(model, rows(value)), 30)
            assert got.tolist() == [value]

    asyncio.run(scenario())
    assert estimator.calls == [1, 1, 1]


def test_slots_predict_side_by_side_and_the_queue_goes_in_one_call() -> None:
    estimator = Recording()
    model = loaded(estimator)
    batcher = Batcher(predict_threads(2), window=0.0, parallel=2)

    async def scenario() -> None:
        estimator.hold.clear()
        first = []
        for value in (0.1, 0.2):  # both slots end up inside predict_proba at once
            first.append(asyncio.create_task(batcher.probabilities(model, rows(value))))
            assert await asyncio.to_thread(estimator.inside.acquire, True, 30)
        queued = [
            asyncio.create_task(batcher.probabilities(model, rows(v, v / 2)))
            for v in (0.3, 0.4, 0.5)
        ]
        while batcher.queued < 3:
            await asyncio.sleep(0.001)
        estimator.hold.set()
        assert [(await t).tolist() for t in first] == [[0.1], [0.2]]
        assert [(await t).tolist() for t in queued] == [[0.3, 0.15], [0.4, 0.2], [0.5, 0.25]]

    asyncio.run(scenario())
    assert sorted(estimator.calls) == [1, 1, 6]  # the three queued requests: one call
    assert (batcher.batches, batcher.largest) == (3, 3)


def test_a_failed_predict_fails_its_batch_only() -> None:
    estimator = Recording()
    model = loaded(estimator)
    batcher = Batcher(predict_threads(1), window=0.0)

    async def scenario() -> None:
        estimator.fail = True
        with pytest.raises(RuntimeError, match="the estimator failed"):
            await batcher.probabilities(model, rows(0.1))
        estimator.fail = False
        assert (await batcher.probabilities(model, rows(0.7))).tolist() == [0.7]

    asyncio.run(scenario())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        Batcher(predict_threads(1), window=-1)
    with pytest.raises(ValueError, match="parallel"):
        Batcher(predict_threads(1), window=0, parallel=0)
