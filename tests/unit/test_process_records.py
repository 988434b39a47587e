"""Process records survive a clock step: a process we started is still recognised, and
stopped, after NTP or a resumed VM moves the wall clock (psutil's create_time moves with it)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from retrain.localstack.processes import ProcessRecord, spawn, stop

pytestmark = pytest.mark.unit

STEP = 30.0  # seconds the clock moves


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[ProcessRecord]:
    record = spawn([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "log",
                   {}, tmp_path)  # fmt: skip
    try:
        yield record
    finally:
        stop(record)


def _step_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a clock step does to psutil on Linux: /proc/stat's btime (boot time, read from the
    wall clock) moves, and with it every process's create_time."""
    boot = psutil.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot + STEP)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
def test_a_clock_step_neither_hides_nor_keeps_alive_a_started_process(
    sleeper: ProcessRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = ProcessRecord.from_json(sleeper.to_json())  # as `retrain down` reads it back
    _step_the_clock(monkeypatch)
    assert abs(psutil.Process(sleeper.pid).create_time() - sleeper.create_time) >= STEP - 1
    assert read.alive()
    assert read.with_children().alive()
    assert stop(read, timeout=10) == [sleeper.pid]
    assert not read.alive()
    assert not psutil.pid_exists(sleeper.pid) or (
        psutil.Process(sleeper.pid).status() == psutil.STATUS_ZOMBIE
    )


def test_another_process_on_a_recycled_pid_is_not_ours(sleeper: ProcessRecord) -> None:
    earlier = ProcessRecord(sleeper.pid, sleeper.create_time - 5, boot_time=sleeper.boot_time)
    assert not earlier.alive()
    assert stop(earlier) == []
    assert sleeper.alive()


def test_records_written_before_boot_times_were_kept_compare_as_before(
    sleeper: ProcessRecord,
) -> None:
    old = ProcessRecord.from_json({"pid": sleeper.pid, "create_time": sleeper.create_time})
    assert old.boot_time is None
    assert old.alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
def test_a_run_workers_record_survives_a_clock_step(
    sleeper: ProcessRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.local_run import worker_alive  # noqa: PLC0415
    from pipelines.process_starts import record_of, same_start  # noqa: PLC0415

    worker = record_of(psutil.Process(sleeper.pid))  # what a worker writes in its run
    _step_the_clock(monkeypatch)
    assert worker_alive(worker)  # else the sweep would take over a run still running
    assert same_start(psutil.Process(sleeper.pid), worker)
    assert not same_start(psutil.Process(sleeper.pid), {**worker, "create_time": 1.0})
    old = {"pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time()}
    assert worker_alive(old)  # an old record (no boot time), read on the same clock
