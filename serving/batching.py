"""Adaptive batching: concurrent requests for one model version share one ``predict_proba``.

A tree ensemble's ``predict_proba`` costs about the same for 8 rows as for 1 (the per-tree
loop dominates), so requests that arrive while a predict runs are gathered and predicted
together, then the result is split back per request.

One :class:`Batcher` per loaded version (a request keeps the version it took at arrival, so
a swap never mixes versions in a batch). Each holds a queue and, while the queue is not
empty, up to ``parallel`` drain tasks on the event loop (one per CPU by default, so that
large requests still predict on every core):

- A request that finds a drain slot free is predicted at once: at concurrency 1 batching
  adds nothing but a hop to the predict thread.
- While every slot predicts, new requests queue. When a predict ends, everything queued is
  predicted in one call. If the server is busy (the previous batch plus what queued behind
  it says how many requests are circulating), the drain waits up to ``window`` seconds for
  that many to queue, so that clients answered a moment ago join the next batch instead of
  trailing it.
  A request never waits longer than the in-flight predict plus ``window``.
- The predict runs on a worker thread (one OpenMP thread there), never on the event loop;
  a batch of at least ``PROCESS_MIN_ROWS`` rows in a predict process instead, when the
  batcher has them (:mod:`serving.predict_processes`: a large predict on a thread loses
  much of its speed to the event loop holding the GIL).

Each request's matrix is built and validated before it is queued, so a bad request gets its
own 400 and never reaches a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from components.compute import available_cpus
from serving.models import LoadedModel
from serving.predict_processes import PredictProcesses

__all__ = ["Batcher", "Batchers", "predict_threads"]

_Pending = tuple[npt.NDArray[np.float64], "asyncio.Future[npt.NDArray[np.float64]]"]


@functools.cache
def _openmp() -> Any:
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415

    return ThreadpoolController()


def _one_openmp_thread() -> None:
    """Limit this thread's OpenMP team to one thread, for good (the limit is per thread: the
    one the server sets at start does not reach the predict threads)."""
    _openmp().limit(limits=1, user_api="openmp")


def predict_threads(count: int | None = None) -> ThreadPoolExecutor:
    """The threads that run ``predict_proba`` (default: one per usable CPU)."""
    return ThreadPoolExecutor(
        max_workers=count or available_cpus(),
        thread_name_prefix="predict",
        initializer=_one_openmp_thread,
    )


class Batcher:
    """Gathers one version's concurrent predictions into ``predict_proba`` calls, at most
    ``parallel`` at a time (a large request is not held up behind another's predict while
    a core is free; small ones still share calls, since they queue while all run)."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        window: float,
        parallel: int = 1,
        processes: PredictProcesses | None = None,
    ) -> None:
        if window < 0:
            raise ValueError(f"the batching window must be 0 or more seconds, got {window}")
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.window = window
        self.parallel = parallel
        self._executor = executor
        self._processes = processes
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        # The tasks hold the version while they drain; the batcher itself does not, so that
        # a version no longer served (and its batcher) can go.
        self._drains: set[asyncio.Task[None]] = set()
        # Counted by the drains themselves: a drain that found the queue empty has given its
        # slot back before anything else runs (its task's done callbacks come a tick later).
        self._active = 0
        self.batches = 0  # predict_proba calls made, for tests and figures
        self.largest = 0  # the most requests one call served

    @property
    def queued(self) -> int:
        """Requests waiting for the next batch."""
        return len(self._queue)

    async def probabilities(
        self, loaded: LoadedModel, x: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """P(positive class) for each row of ``x``, predicted by ``loaded`` (this batcher's
        version) together with whatever else is queued."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[npt.NDArray[np.float64]] = loop.create_future()
        self._queue.append((x, future))
        self._arrived.set()
        if self._active < self.parallel:
            self._active += 1
            drain = loop.create_task(self._drain(loaded))
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        return await future

    async def _drain(self, loaded: LoadedModel) -> None:
        loop = asyncio.get_running_loop()
        circulating = 0  # requests seen in the last cycle: the last batch and its followers
        try:
            while self._queue:
                if self.window and len(self._queue) < circulating:
                    await self._gather(loop, circulating)
                    if not self._queue:  # another drain took them meanwhile
                        break
                batch, self._queue = self._queue, []
                await self._predict(loop, loaded, batch)
                circulating = len(batch) + len(self._queue)
        except BaseException:
            if self._active <= 1:  # the loop is shutting down under us: no drain will run
                for _, future in self._queue:
                    future.cancel()
                self._queue = []
            raise
        finally:
            self._active -= 1

    async def _gather(self, loop: asyncio.AbstractEventLoop, wanted: int) -> None:
        """Wait until ``wanted`` requests are queued, or ``window`` seconds have passed."""
        deadline = loop.time() + self.window
        while len(self._queue) < wanted:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _predict(
        self, loop: asyncio.AbstractEventLoop, loaded: LoadedModel, batch: list[_Pending]
    ) -> None:
        matrices = [x for x, _ in batch]
        x = matrices[0] if len(matrices) == 1 else np.vstack(matrices)
        processes = self._processes
        try:
            proba = None
            if processes is not None and len(x) >= processes.min_rows:
                proba = await processes.probabilities(loaded, x)
            if proba is None:
                proba = await loop.run_in_executor(self._executor, loaded.probabilities, x)
        except Exception as exc:  # noqa: BLE001 (each request of the batch re-raises it: a 500)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        start = 0
        for matrix, future in batch:
            end = start + len(matrix)
            if not future.done():  # a request whose client went away was cancelled
                future.set_result(proba[start:end])
            start = end


class Batchers:
    """One :class:`Batcher` per loaded version, dropped with the version once it is no
    longer served (a swapped-out version's batcher finishes what it holds, then goes)."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        window: float,
        parallel: int = 1,
        processes: PredictProcesses | None = None,
    ) -> None:
        if window < 0:
            raise ValueError(f"the batching window must be 0 or more seconds, got {window}")
        self.executor = executor
        self.window = window
        self.parallel = parallel
        self.processes = processes
        self._batchers: weakref.WeakKeyDictionary[LoadedModel, Batcher] = (
            weakref.WeakKeyDictionary()
        )

    def __iter__(self) -> Iterator[Batcher]:
        """The batchers of the versions still in memory."""
        return iter(list(self._batchers.values()))

    def __call__(self, loaded: LoadedModel) -> Batcher:
        """``loaded``'s batcher (made on first use)."""
        batcher = self._batchers.get(loaded)
        if batcher is None:
            batcher = Batcher(self.executor, self.window, self.parallel, self.processes)
            self._batchers[loaded] = batcher
        return batcher

    async def probabilities(
        self, loaded: LoadedModel, x: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """P(positive class) for each row of ``x``, predicted in ``loaded``'s next batch."""
        return await self(loaded).probabilities(loaded, x)
