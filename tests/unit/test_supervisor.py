"""The supervisor's rounds on a standing clock: when a dead part is restarted (backoff),
and when Firestore is exported. The stack is a fake that records what it was asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import psutil
import pytest

from retrain.localstack import Stack
from retrain.localstack.processes import ProcessRecord
from retrain.localstack.supervisor import Backoff, Supervisor

pytestmark = pytest.mark.unit

ALIVE = ProcessRecord(os.getpid(), psutil.Process().create_time())
DEAD = ProcessRecord(os.getpid(), 1.0)  # (a recycled pid: not the process recorded)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStack:
    """Parts that are dead or alive as the test says; restarts and exports recorded."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.parts = {"serving": ALIVE, "pubsub": ALIVE}
        self.restarts: list[tuple[str, float]] = []
        self.exports: list[float] = []
        self.fail = False

    def records(self) -> dict[str, ProcessRecord]:
        return dict(self.parts)

    def restart(self, name: str, *, only_if_dead: bool, abort: object) -> bool:
        assert only_if_dead, "the supervisor must not restart a part someone else restarted"
        del abort
        self.restarts.append((name, self.clock.now))
        if self.fail:
            raise RuntimeError("the part did not come back")
        return True

    def export_firestore(self) -> Path | None:
        self.exports.append(self.clock.now)
        return Path("export")


def supervised() -> tuple[Supervisor, FakeStack, Clock]:
    clock = Clock()
    stack = FakeStack(clock)
    supervisor = Supervisor(cast(Stack, stack), clock=clock, export_seconds=10.0)
    supervisor.next_export = clock.now + 10.0
    return supervisor, stack, clock


def rounds_until(supervisor: Supervisor, clock: Clock, end: float, step: float = 0.25) -> None:
    while clock.now < end:
        supervisor.round()
        clock.now += step


def test_backoff_doubles_to_its_cap_and_starts_again_after_a_healthy_minute() -> None:
    backoff = Backoff()
    delays = []
    now = 0.0
    for _ in range(7):
        delays.append(backoff.delay(now))
        backoff.restarted(now)
        now += 5.0  # each restart dies 5 s later
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(now + 60) == 1, "a part that lived a minute starts again at 1 s"


def test_a_dead_part_is_restarted_after_its_delay_and_again_later_if_it_stays_dead() -> None:
    supervisor, stack, clock = supervised()
    start = clock.now
    stack.parts["serving"] = DEAD
    stack.fail = True  # it does not come back: each attempt fails
    rounds_until(supervisor, clock, start + 20)
    attempts = [at - start for name, at in stack.restarts]
    assert {name for name, _ in stack.restarts} == {"serving"}, "only the dead part"
    # seen dead at 0: restarted 1 s later; each failure doubles the wait (from when it is
    # seen dead again, the next round)
    assert attempts == [1.0, 3.25, 7.5, 15.75]
    stack.fail = False
    stack.parts["serving"] = ALIVE
    rounds_until(supervisor, clock, start + 100)  # alive for more than a minute
    stack.parts["serving"] = DEAD
    died = clock.now
    rounds_until(supervisor, clock, died + 3)
    assert stack.restarts[-1][1] - died == 1.0, "back to the first delay"


def test_firestore_is_exported_every_interval() -> None:
    supervisor, stack, clock = supervised()
    start = clock.now
    rounds_until(supervisor, clock, start + 35)
    assert [at - start for at in stack.exports] == [10.0, 20.0, 30.0]


def test_a_stopping_supervisor_restarts_nothing() -> None:
    supervisor, stack, clock = supervised()
    stack.parts["pubsub"] = DEAD
    supervisor.stopping.set()
    rounds_until(supervisor, clock, clock.now + 40)
    assert stack.restarts == []
    assert stack.exports == []


def test_a_started_process_that_ended_on_its_own_gives_no_warning_at_exit(tmp_path: Path) -> None:
    """A part killed from outside (as the healing tests do) or crashed is reaped: the
    interpreter that started it exits without "ResourceWarning: subprocess N is still
    running"."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from retrain.localstack.processes import spawn, wait_until\n"
        "import psutil\n"
        "record = spawn([sys.executable, '-c', 'pass'], Path(sys.argv[1]), {}, Path.cwd())\n"
        "assert wait_until(lambda: psutil.Process(record.pid).status() == 'zombie', 30)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-X", "dev", "-c", code,
         str(tmp_path / "part.log")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr, done.stderr
