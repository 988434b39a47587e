"""The prediction log's writer: a sample of requests, batched and uploaded off the request path.

The request path calls :meth:`PredictionLog.sampled` (one random draw, none at rate 1 or 0;
the rate is lowered while the model's requests bring more than ``max_rows`` instances a
second, so that about that many are logged) and :meth:`PredictionLog.append`, which puts a
tuple in a bounded in-memory buffer under a lock: nothing else. A background thread, every
``flush_seconds`` (sooner when ``batch_records`` wait), turns the buffer into
:class:`~retrain.predictions.PredictionRecord` objects, one object per model and at most
:data:`~retrain.predictions.MAX_SPAN_SECONDS` of records, and uploads each with
:func:`retrain.predictions.encode` to ``object_name(settings.predictions_prefix(model),
first time, writer, seq)``. The writer is the host and the process id, so the workers of one
server (``--workers N``) never collide.

An object is named once, when its records are taken from the buffer, and written create-only
(``if_generation_match=0``): an upload retried after a failure that had in fact written it
finds it there (412) and counts it as written, so a record is never written twice.

If the store cannot be reached, the objects wait and are retried (with a growing pause, at
most ``max_retry_seconds``); the request path never waits for them. At most ``capacity``
records wait in all; beyond that the oldest are dropped, counted in :attr:`dropped`, and a
warning says how many. :meth:`close` (the app's shutdown) stops the thread after writing
everything it can, within ``close_timeout`` seconds.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from retrain import blobstore
from retrain.config import Settings
from retrain.predictions import MAX_SPAN_SECONDS, PredictionRecord, encode, object_name

__all__ = ["PredictionLog", "Writer", "gcs_writer", "writer_id"]

log = logging.getLogger(__name__)

Writer = Callable[[str, bytes], object]
"""``write(uri, data)``: create the object ``uri`` (raise if it cannot; see :func:`gcs_writer`)."""

# What the request path appends: (request id, time, model, version, instances, predictions).
_Entry = tuple[str, float, str, str, list[Any], list[dict[str, Any]]]
_UPLOAD_TIMEOUT = 10.0  # seconds for one upload before it counts as failed (and is retried)


def writer_id() -> str:
    """This process: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


class AlreadyWritten(Exception):
    """The object exists: an earlier attempt wrote it."""


def gcs_writer(client: Any | None = None) -> Writer:
    """Create-only uploads through google-cloud-storage (fake-gcs-server by
    ``STORAGE_EMULATOR_HOST``); the client is made on first use, in the writer's thread.
    An upload that finds the object there raises :class:`AlreadyWritten`."""
    made: list[Any] = [] if client is None else [client]

    def write(uri: str, data: bytes) -> object:
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415

        if not made:
            from google.cloud import storage  # noqa: PLC0415

            made.append(storage.Client())
        try:
            # No library retry: a failed upload waits in the buffer and is tried again later.
            return blobstore.write_bytes(
                uri, data, made[0], if_generation_match=0, retry=None, timeout=_UPLOAD_TIMEOUT
            )
        except PreconditionFailed as exc:
            raise AlreadyWritten(uri) from exc

    return write


@dataclass
class _Object:
    """One object to write: its name, fixed when its records were taken, and its records."""

    uri: str
    records: list[PredictionRecord]


class PredictionLog:
    """Samples, buffers and writes prediction records for ``rates`` (model -> share logged).

    ``prefixes``: model -> ``gs://`` prefix (``Settings.predictions_prefix``). Start it with
    :meth:`start`, stop it with :meth:`close`.
    """

    def __init__(
        self,
        rates: Mapping[str, float],
        prefixes: Mapping[str, str],
        write: Writer,
        *,
        writer: str | None = None,
        flush_seconds: float = 1.0,
        batch_records: int = 2000,
        capacity: int = 100_000,
        max_retry_seconds: float = 30.0,
        close_timeout: float = 15.0,
        clock: Callable[[], float] = time.time,
        max_rows: Mapping[str, float | None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or batch_records < 1:
            raise ValueError(
                f"capacity ({capacity}) and batch_records ({batch_records}) must be at least 1"
            )
        if flush_seconds <= 0:
            raise ValueError(f"flush_seconds must be more than 0, got {flush_seconds}")
        for model, rate in rates.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"{model}: log_sample_rate must be in [0, 1], got {rate}")
        self.rates = dict(rates)
        self.max_rows = {m: cap for m, cap in (max_rows or {}).items() if cap is not None}
        if any(cap <= 0 for cap in self.max_rows.values()):
            raise ValueError(f"max_rows must be more than 0, got {self.max_rows}")
        self.monotonic = monotonic
        # model -> [start of this second, rows seen in it, rows seen in the second before]
        self._volume: dict[str, list[float]] = {}
        self.prefixes = dict(prefixes)
        self.write = write
        self.writer = writer or writer_id()
        self.flush_seconds = flush_seconds
        self.batch_records = batch_records
        self.capacity = capacity
        self.max_retry_seconds = max_retry_seconds
        self.close_timeout = close_timeout
        self.clock = clock
        self.dropped = 0  # records dropped because the buffer was full
        self.written = 0  # records written
        self.objects = 0  # objects written
        self._buffer: deque[_Entry] = deque()
        self._waiting: deque[_Object] = deque()  # named, not yet written (oldest first)
        self._held = 0  # the records in _waiting
        self._lock = threading.Lock()  # the buffer, the waiting objects and the counters
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._failing_since: float | None = None
        self._warned_drops = 0

    @classmethod
    def for_settings(cls, settings: Settings, write: Writer, **options: Any) -> PredictionLog:
        """A log of every model of ``settings`` at its ``serving.log_sample_rate``."""
        return cls(
            {name: spec.serving.log_sample_rate for name, spec in settings.models.items()},
            {name: settings.predictions_prefix(name) for name in settings.models},
            write,
            max_rows={
                name: spec.serving.log_max_rows_per_second for name, spec in settings.models.items()
            },
            **options,
        )

    # -- the request path ------------------------------------------------------------------

    def sampled(self, model: str, rows: int = 1) -> bool:
        """Whether to log this request of ``model`` with ``rows`` instances (a random draw at
        its rate, lowered while the last second brought more than its ``max_rows``). Called
        from one thread (the event loop): the volume counters take no lock."""
        rate = self.rates.get(model, 0.0)
        cap = self.max_rows.get(model)
        if cap is not None and rate > 0.0:
            rate *= self._share(model, rows, cap)
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)  # noqa: S311

    def _share(self, model: str, rows: int, cap: float) -> float:
        """The share of requests to log so that about ``cap`` rows a second are: judged by
        the last whole second's rows (1 while it brought at most ``cap``)."""
        now = self.monotonic()
        volume = self._volume.get(model)
        if volume is None:
            volume = self._volume[model] = [now, 0.0, 0.0]
        elapsed = now - volume[0]
        if elapsed >= 1.0:  # a new second: the one that ended is the last (none if skipped)
            volume[:] = [now, 0.0, volume[1] if elapsed < 2.0 else 0.0]
        volume[1] += rows
        last = volume[2]
        return 1.0 if last <= cap else cap / last

    def append(
        self,
        request_id: str,
        model: str,
        version: str,
        instances: list[Any],
        predictions: list[dict[str, Any]],
    ) -> None:
        """Buffer one answered request (never blocks on I/O, never raises on a full buffer:
        the oldest record goes). ``instances`` and ``predictions`` are not copied: the caller
        must not change them."""
        entry = (request_id, self.clock(), model, version, instances, predictions)
        with self._lock:
            self._buffer.append(entry)
            if len(self._buffer) + self._held > self.capacity:
                self._drop_oldest()
            full = len(self._buffer) >= self.batch_records
        if full:
            self._wake.set()

    # -- the writer thread -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is buffered (within ``close_timeout``), then stop the thread. What could
        not be written is counted in :attr:`dropped` and logged."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.close_timeout + _UPLOAD_TIMEOUT + 5)
        else:
            self._drain(time.monotonic() + self.close_timeout)
        with self._lock:
            lost = len(self._buffer) + self._held
            self.dropped += lost
            self._buffer.clear()
            self._waiting.clear()
            self._held = 0
        if lost:
            log.warning("prediction log: %d records could not be written before shutdown", lost)

    def pending(self) -> int:
        """Records not written yet."""
        with self._lock:
            return len(self._buffer) + self._held

    def _run(self) -> None:
        pause = self.flush_seconds
        while not self._stop.is_set():
            self._wake.wait(pause)
            self._wake.clear()
            if self._stop.is_set():
                break
            ok = self._flush()
            # After a failure, wait longer each time (up to max_retry_seconds): a store that
            # is down is not hammered, and the buffer keeps filling meanwhile (to its bound).
            pause = self.flush_seconds if ok else min(pause * 2, self.max_retry_seconds)
        self._drain(time.monotonic() + self.close_timeout)

    def _drain(self, deadline: float) -> None:
        """Flush until everything is written or ``deadline`` (monotonic) has passed."""
        pause = 0.05
        while not self._flush(deadline) and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)

    def _flush(self, deadline: float | None = None) -> bool:
        """Name objects for what is buffered, then write every waiting object, oldest first;
        False if one failed (it and the later ones wait for the next try)."""
        self._take()
        while True:
            with self._lock:
                if not self._waiting:
                    self._failing_since = None
                    return True
                head = self._waiting[0]
                records = list(head.records)
            if deadline is not None and time.monotonic() > deadline:
                return False
            try:
                self.write(head.uri, encode(records))
            except AlreadyWritten:
                pass  # an earlier attempt that seemed to fail wrote it
            except Exception as exc:  # noqa: BLE001 (any failure of the store: retry later)
                self._failed(head.uri, exc)
                return False
            with self._lock:
                if self._waiting and self._waiting[0] is head:
                    self._waiting.popleft()
                    self._held -= len(head.records)
                self.written += len(records)
                self.objects += 1

    def _take(self) -> None:
        """Move the buffer into named objects: per model, in order, each at most
        ``batch_records`` records and MAX_SPAN_SECONDS long."""
        with self._lock:
            entries = list(self._buffer)
            self._buffer.clear()
        if not entries:
            return
        by_model: dict[str, list[PredictionRecord]] = {}
        for request_id, at, model, version, instances, predictions in entries:
            by_model.setdefault(model, []).append(
                PredictionRecord(
                    request_id=request_id,
                    time=at,
                    model=model,
                    version=version,
                    instances=instances,
                    scores=[row["probability"] for row in predictions],
                    labels=[row["label"] for row in predictions],
                )
            )
        made: list[_Object] = []
        for model, records in by_model.items():
            start = 0
            for end in range(1, len(records) + 1):
                last = end == len(records)
                if (
                    last
                    or end - start >= self.batch_records
                    or records[end].time - records[start].time >= MAX_SPAN_SECONDS
                ):
                    made.append(self._object(model, records[start:end]))
                    start = end
        with self._lock:
            self._waiting.extend(made)
            self._held += len(entries)
            if len(self._buffer) + self._held > self.capacity:
                self._drop_oldest()

    def _object(self, model: str, records: list[PredictionRecord]) -> _Object:
        self._seq += 1
        uri = object_name(self.prefixes[model], records[0].time, self.writer, self._seq)
        return _Object(uri, records)

    def _drop_oldest(self) -> None:
        """Drop the oldest records until at most ``capacity`` wait (the lock is held)."""
        excess = len(self._buffer) + self._held - self.capacity
        while excess > 0 and self._waiting:
            head = self._waiting[0]
            cut = min(excess, len(head.records))
            head.records = head.records[cut:]
            if not head.records:
                self._waiting.popleft()
            self._held -= cut
            excess -= cut
            self.dropped += cut
        while excess > 0 and self._buffer:
            self._buffer.popleft()
            excess -= 1
            self.dropped += 1
        if self.dropped >= self._warned_drops * 2 + 1:  # a warning at 1, 3, 7, 15, ... drops
            self._warned_drops = self.dropped
            log.warning(
                "prediction log: the buffer is full (%d records waiting for the store); "
                "%d oldest records dropped so far",
                self.capacity,
                self.dropped,
            )

    def _failed(self, uri: str, exc: Exception) -> None:
        now = time.monotonic()
        first = self._failing_since is None
        if first:
            self._failing_since = now
        level = logging.WARNING if first else logging.DEBUG
        log.log(
            level,
            "prediction log: cannot write %s (%s); %d records wait, retrying",
            uri,
            exc,
            self.pending(),
        )
