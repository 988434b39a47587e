"""Large batches predicted in separate processes, each with its own GIL.

A tree ensemble's ``predict_proba`` releases the GIL inside each tree and takes it back
between trees (scikit-learn loops over the trees in Python). On a predict thread of a busy
server, every one of those hand-overs waits for the event loop, which holds the GIL while it
parses bodies and encodes answers: with the event loop busy a fifth of the time, two predict
threads did 71 % of their idle-server throughput, at half the time 40 % (1,000-row batches,
2 CPUs). Small batches do not suffer (one predict is a few milliseconds, and a hop to another
process would cost more than it saves), so only batches of at least
:data:`PROCESS_MIN_ROWS` rows come here.

A batch with :data:`PROCESS_MIN_ROWS` rows for each process is split among the processes
that no other batch keeps busy, so that one very large request uses every idle CPU; under
load, when every process has work, a batch stays whole (one call's fixed costs, ~1 ms of
scikit-learn's per-tree loop and a round trip, instead of one per part). The processes are
spawned on the first large batch, in the background; until they have started (imports take
seconds), and whenever they cannot serve (one died, or cannot load the version), the batch
predicts on a thread as before, so no request waits for them or fails because of them.
Each process loads a version from its folder in the server's cache, once: a folder is never
replaced once complete (:class:`serving.models.ModelStore`), so a process predicts with
exactly the version the request was routed to, as the thread would.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import numpy.typing as npt

from retrain.gatekeeper.registry import ModelVersion
from serving.models import LoadedModel, ModelLoadError, load_model

__all__ = ["PROCESS_MIN_ROWS", "PredictProcesses"]

log = logging.getLogger(__name__)

PROCESS_MIN_ROWS = 512  # batches this large predict in a process (1,000 rows: ~15 ms)
_WATCH_SECONDS = 0.5  # how often a predict process checks that its server lives
_VERSIONS_KEPT = 4  # versions loaded per process (the champion, a canary, the ones before)

# In each predict process: the versions it has loaded, by folder, most recent last.
_loaded: OrderedDict[str, LoadedModel] = OrderedDict()


def _start_child(server: int) -> None:
    """A predict process's start: one OpenMP thread, as on the predict threads, and a watch
    on the server: if it dies without stopping the pool (kill -9), this process exits too
    (it would otherwise wait for work forever: it holds its queue's writing end itself).
    ``server`` is the server's pid, passed in: by the time this runs it may be dead."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    from serving.collector import freeze_heap  # noqa: PLC0415

    threadpool_limits(limits=1, user_api="openmp")

    def watch() -> None:
        while os.getppid() == server:
            time.sleep(_WATCH_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()
    freeze_heap()  # what was imported is never scanned again


def _child_pid() -> int:
    return os.getpid()


def _child_probabilities(
    version: ModelVersion, directory: str, x: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """In a predict process: ``version`` (loaded from ``directory`` once) on ``x``."""
    loaded = _loaded.get(directory)
    if loaded is None:
        # Only large batches come here: scikit-learn predicts them all.
        loaded = load_model(version, Path(directory), small_batches=False)
        _loaded[directory] = loaded
        while len(_loaded) > _VERSIONS_KEPT:
            _loaded.popitem(last=False)
    else:
        _loaded.move_to_end(directory)
    return loaded.probabilities(x)


class PredictProcesses:
    """``count`` predict processes, started on first use; see the module's docstring."""

    def __init__(self, count: int, min_rows: int = PROCESS_MIN_ROWS) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.count = count
        self.min_rows = min_rows
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._ready = threading.Event()
        self._closed = False
        self._busy = 0  # parts submitted and not yet answered (touched on the event loop)
        self.batches = 0  # batches predicted in a process, for tests and figures
        self.parts = 0  # the pieces they were predicted in (a batch split among idle ones)
        self.restarts = 0  # pools replaced after a process died

    @property
    def pids(self) -> list[int]:
        """The processes' ids (empty before they start)."""
        pool = self._pool
        return [] if pool is None else list(getattr(pool, "_processes", {}) or {})

    def start(self) -> None:
        """Spawn the processes in the background, if not yet started."""
        with self._lock:
            if self._pool is not None or self._closed:
                return
            pool = ProcessPoolExecutor(
                self.count,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(),),
            )
            self._pool = pool
            # The pool spawns a process per task that finds none idle: one task each.
            started = [pool.submit(_child_pid) for _ in range(self.count)]
        remaining = [len(started)]

        def done(future: Future[int]) -> None:
            with self._lock:
                remaining[0] -= 1
                if future.exception() is None and remaining[0] == 0 and self._pool is pool:
                    self._ready.set()

        for future in started:
            future.add_done_callback(done)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def probabilities(
        self, loaded: LoadedModel, x: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64] | None:
        """P(positive class) for ``x`` from a predict process, or None if none can answer
        now (the caller predicts on a thread)."""
        if loaded.directory is None:
            return None  # not loaded from a folder: a process could not load it
        pool = self._pool
        if pool is None or not self._ready.is_set():
            self.start()
            return None
        # A batch large enough for several processes is split among the idle ones: one
        # request of 10,000 rows is answered in about half the time on 2 CPUs.
        parts = max(1, min(self.count - self._busy, len(x) // self.min_rows))
        directory = str(loaded.directory)
        self._busy += parts
        try:
            futures = [
                asyncio.wrap_future(
                    pool.submit(_child_probabilities, loaded.version, directory, part)
                )
                for part in np.array_split(x, parts)
            ]
            results = await asyncio.gather(*futures)
        except BrokenProcessPool:
            self._restart(pool)
            return None
        except ModelLoadError as exc:
            log.warning("a predict process cannot load %s; predicting on a thread: %s",
                        loaded.version.version, exc)  # fmt: skip
            return None
        finally:
            self._busy -= parts
        self.batches += 1
        self.parts += parts
        proba: npt.NDArray[np.float64] = results[0] if parts == 1 else np.concatenate(results)
        return proba

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another batch restarted it already
            self._pool = None
            self._ready.clear()
            self.restarts += 1
        log.warning("a predict process died; starting new ones (meanwhile on threads)")
        broken.shutdown(wait=False, cancel_futures=True)
        self.start()

    def close(self) -> None:
        """Stop the processes (what they hold is not waited for)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            self._ready.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
