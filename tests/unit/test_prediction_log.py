"""The prediction log's writer in process: what it writes, how it batches, and what it does
while the store is down (a writer that fails like an unreachable store)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from retrain.localstack.processes import wait_until
from retrain.predictions import MAX_SPAN_SECONDS, decode, time_of
from serving.prediction_log import AlreadyWritten, PredictionLog
from tests.unit.test_serving import SETTINGS

pytestmark = pytest.mark.unit

PREFIXES = {"a": "gs://art/predictions/a/", "b": "gs://art/predictions/b/"}


class Store:
    """Objects by URI; create-only, like the GCS writer; can be made to fail."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False
        self.attempts = 0
        self.lock = threading.Lock()

    def __call__(self, uri: str, data: bytes) -> object:
        with self.lock:
            self.attempts += 1
            if self.down:
                raise ConnectionError("connection refused (the store is down)")
            if uri in self.objects:
                raise AlreadyWritten(uri)
            self.objects[uri] = data
        return 1

    def records(self) -> list[Any]:
        with self.lock:
            found = dict(self.objects)
        out = []
        for uri in sorted(found):
            out.extend(decode(found[uri], uri))
        return out


class Clock:
    def __init__(self, start: float = 1_796_053_501.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def rows(n: int) -> list[dict[str, Any]]:
    return [{"label": "wet" if i % 2 else "dry", "probability": i / 10} for i in range(n)]


def test_records_are_written_per_model_with_what_was_answered() -> None:
    store, clock = Store(), Clock()
    plog = PredictionLog({"a": 1.0, "b": 1.0}, PREFIXES, store, writer="host-7", clock=clock)
    plog.append("r1", "a", "3", [[1.0, 2.0]], rows(1))
    clock.now += 0.5
    plog.append("r2", "b", "1", [{"x": 1}, {"x": 2}], rows(2))
    plog.append("r3", "a", "4", [[3.0, 4.0]], rows(1))
    plog.close()  # never started: close writes what waits
    assert sorted(store.objects) == [
        "gs://art/predictions/a/20261130T154501.000000Z-host_7-000001.jsonl",
        "gs://art/predictions/b/20261130T154501.500000Z-host_7-000002.jsonl",
    ]
    a, b = (decode(store.objects[uri], uri) for uri in sorted(store.objects))
    assert [(r.request_id, r.version, r.instances, r.scores, r.labels) for r in a] == [
        ("r1", "3", [[1.0, 2.0]], [0.0], ["dry"]),
        ("r3", "4", [[3.0, 4.0]], [0.0], ["dry"]),
    ]
    assert [(r.request_id, r.model, r.time, r.scores, r.labels) for r in b] == [
        ("r2", "b", clock.now, [0.0, 0.1], ["dry", "wet"])
    ]
    assert time_of(sorted(store.objects)[1]) == clock.now
    assert (plog.written, plog.objects, plog.dropped, plog.pending()) == (3, 2, 0, 0)


def test_an_object_holds_at_most_batch_records_and_max_span_seconds() -> None:
    store, clock = Store(), Clock()
    plog = PredictionLog({"a": 1.0}, PREFIXES, store, batch_records=4, clock=clock)
    for i in range(10):
        plog.append(f"r{i}", "a", "1", [[i]], rows(1))
    clock.now += MAX_SPAN_SECONDS + 1
    plog.append("late", "a", "1", [[0]], rows(1))
    plog.close()
    sizes = [len(decode(store.objects[uri], uri)) for uri in sorted(store.objects)]
    assert sizes == [4, 4, 2, 1]
    assert [r.request_id for r in store.records()] == [*(f"r{i}" for i in range(10)), "late"]


def test_sampling_honours_the_rate() -> None:
    plog = PredictionLog({"half": 0.5, "off": 0.0, "all": 1.0}, {}, Store())
    draws = 4000
    half = sum(plog.sampled("half") for _ in range(draws))
    # Binomial(4000, 0.5): sd 31.6; 6 sd either side fails once in 10^9 runs.
    assert abs(half - draws / 2) < 6 * 31.6
    assert not any(plog.sampled("off") for _ in range(draws))
    assert all(plog.sampled("all") for _ in range(draws))
    assert not plog.sampled("unknown model")


def test_heavy_traffic_is_logged_at_about_max_rows_a_second() -> None:
    """Under the cap everything is logged; over it, one draw per request at the share that
    keeps the logged instances near the cap, judged by the last whole second."""
    ticks = Clock()
    plog = PredictionLog({"m": 1.0, "half": 0.5, "free": 1.0}, {}, Store(),
                         max_rows={"m": 10_000, "half": 10_000, "free": None},
                         monotonic=ticks)  # fmt: skip

    def second(model: str, requests: int, rows: int) -> int:
        """``requests`` of ``rows`` instances spread over one second; how many are logged."""
        logged = 0
        for _ in range(requests):
            logged += plog.sampled(model, rows)
            ticks.now += 1.0 / requests
        return logged

    assert second("m", 50, 100) == 50  # 5,000 rows/s: all, and so the next second too
    assert second("m", 100, 1000) == 100  # the last second was under the cap
    logged = second("m", 100, 1000)  # the last second brought 100,000 rows: share 0.1
    # Binomial(100, 0.1): sd 3; 6 sd either side fails once in 10^9 runs.
    assert abs(logged - 10) <= 18
    assert abs(sum(second("m", 100, 1000) for _ in range(20)) - 200) < 6 * 13.5
    ticks.now += 5  # quiet seconds: the estimate starts again
    assert second("m", 10, 1) == 10
    assert second("half", 100, 1000) in range(20, 81)  # rate 0.5, the cap not yet known
    assert abs(sum(second("half", 100, 1000) for _ in range(20)) - 100) < 6 * 9.8
    assert second("free", 100, 1000) == 100
    assert second("free", 100, 1000) == 100  # no cap: every request
    with pytest.raises(ValueError, match="max_rows must be more than 0"):
        PredictionLog({"m": 1.0}, {}, Store(), max_rows={"m": 0})


def test_the_cap_is_a_setting_with_a_default() -> None:
    spec = SETTINGS.models["rainfall"]
    assert spec.serving.log_max_rows_per_second == 10_000
    plog = PredictionLog.for_settings(SETTINGS, Store())
    assert plog.max_rows == dict.fromkeys(SETTINGS.models, 10_000)


def test_a_store_outage_keeps_everything_up_to_the_bound_then_drops_the_oldest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store()
    store.down = True
    plog = PredictionLog(
        {"a": 1.0}, PREFIXES, store, flush_seconds=0.02, max_retry_seconds=0.05, capacity=50
    )
    plog.start()
    try:
        for i in range(40):
            plog.append(f"r{i}", "a", "1", [[i]], rows(1))  # never blocks, never raises
        assert wait_until(lambda: store.attempts >= 3, timeout=10), "the writer did not retry"
        assert plog.dropped == 0
        assert plog.pending() == 40
        with caplog.at_level(logging.WARNING, logger="serving.prediction_log"):
            for i in range(40, 60):
                plog.append(f"r{i}", "a", "1", [[i]], rows(1))
        assert wait_until(lambda: plog.dropped == 10, timeout=10)
        assert plog.pending() == 50
        assert any("buffer is full" in r.getMessage() for r in caplog.records)
        store.down = False
        assert wait_until(lambda: plog.pending() == 0, timeout=10), (
            "nothing written once the store was back"
        )
    finally:
        plog.close()
    assert [r.request_id for r in store.records()] == [f"r{i}" for i in range(10, 60)]
    assert (plog.written, plog.dropped) == (50, 10)


def test_an_upload_that_failed_after_writing_is_not_written_twice() -> None:
    store = Store()
    plog = PredictionLog({"a": 1.0}, PREFIXES, store)
    written_then_failed: list[str] = []

    def flaky(uri: str, data: bytes) -> object:
        if not written_then_failed:
            store(uri, data)  # it lands, but the answer is lost
            written_then_failed.append(uri)
            raise TimeoutError("the answer did not arrive")
        return store(uri, data)

    plog.write = flaky
    plog.append("r1", "a", "1", [[1]], rows(1))
    plog.close()
    assert [r.request_id for r in store.records()] == ["r1"]
    assert list(store.objects) == written_then_failed
    assert (plog.written, plog.dropped) == (1, 0)


def test_close_with_the_store_down_ends_in_time_and_counts_what_is_lost() -> None:
    store = Store()
    store.down = True
    plog = PredictionLog({"a": 1.0}, PREFIXES, store, close_timeout=0.2)
    plog.start()
    for i in range(5):
        plog.append(f"r{i}", "a", "1", [[i]], rows(1))
    closer = threading.Thread(target=plog.close)
    closer.start()
    closer.join(15)
    assert not closer.is_alive(), "close() did not return with the store down"
    assert (plog.written, plog.dropped, plog.pending()) == (0, 5, 0)


def test_a_full_batch_wakes_the_writer_before_the_period() -> None:
    store = Store()
    plog = PredictionLog({"a": 1.0}, PREFIXES, store, flush_seconds=60, batch_records=5)
    plog.start()
    try:
        for i in range(5):
            plog.append(f"r{i}", "a", "1", [[i]], rows(1))
        assert wait_until(lambda: plog.written == 5, timeout=10), (
            "a full batch waited for the period"
        )
    finally:
        plog.close()


def test_bad_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="a: log_sample_rate must be in"):
        PredictionLog({"a": 1.5}, PREFIXES, Store())
    with pytest.raises(ValueError, match="capacity"):
        PredictionLog({}, PREFIXES, Store(), capacity=0)
    with pytest.raises(ValueError, match="flush_seconds"):
        PredictionLog({}, PREFIXES, Store(), flush_seconds=0)
