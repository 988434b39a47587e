"""`retrain up / status / down` as a user runs them, on the real emulators."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from retrain.config import load_settings
from retrain.localstack import Stack, StackError, emulators
from retrain.localstack.processes import wait_until
from retrain.statedb import Database
from tests.conftest import write_config

pytestmark = pytest.mark.e2e

PARTS = [
    "pubsub",
    "firestore",
    "gcs",
    "on_data_arrival",
    "on_drift",
    "on_schedule",
    "gatekeeper",
    "scheduler",
    "serving",
]


def retrain(*args: str, config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={"COLUMNS": "200", "PATH": os.environ["PATH"]},
    )


def recorded_pids(config: Path) -> list[int]:
    state = json.loads((config.parent / "state" / "stack.json").read_text(encoding="utf-8"))
    pids = []
    for part in state["parts"].values():
        pids.append(part["process"]["pid"])
        pids.extend(pid for pid, _ in part["process"]["children"])
    return pids


def supervisor_pid(config: Path) -> int:
    state = json.loads((config.parent / "state" / "stack.json").read_text(encoding="utf-8"))
    pid: int = state["supervisor"]["process"]["pid"]
    return pid


def running(pid: int) -> bool:
    return psutil.pid_exists(pid) and bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)


def test_up_status_second_up_and_down_leave_nothing_running(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    started = retrain("up", "--detach", config=config)
    assert started.returncode == 0, started.stderr
    try:
        for part in PARTS:
            assert part in started.stdout
        pids = recorded_pids(config)
        # the emulators' JVMs, fake-gcs-server, 4 functions (and their workers), scheduler, server
        assert len(pids) >= len(PARTS)
        supervisor = supervisor_pid(config)
        assert running(supervisor), "--detach leaves a supervisor running"
        pids.append(supervisor)

        status = retrain("status", config=config)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("healthy") == len(PARTS)

        again = retrain("up", "--detach", config=config)
        assert again.returncode == 0
        assert "already runs" in again.stdout
        assert recorded_pids(config) == pids[:-1], "a second up must not start anything"
        _ledger_and_registry(config).doc("registry", "kept").set({"champion": "7"})
    finally:
        stopped = retrain("down", config=config)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("stopped supervisor, "), "the supervisor is stopped first"
    assert wait_until(
        lambda: (
            not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                for p in pids
            )
        ),
        timeout=10,
    )
    after = retrain("status", config=config)
    assert after.returncode == 1
    assert "no local stack is running" in after.stdout
    assert retrain("down", config=config).stdout.startswith("no local stack is running")

    # Up again at once (its ports in TIME_WAIT are free): the Firestore emulator keeps its
    # data in memory, but `down` exported the ledger and the registry and `up` imports them.
    restarted = retrain("up", "--detach", config=config)
    try:
        assert restarted.returncode == 0, restarted.stderr
        assert _ledger_and_registry(config).read_path("registry", "kept").data == {"champion": "7"}
    finally:
        assert retrain("down", config=config).returncode == 0


def _ledger_and_registry(config: Path) -> Database:
    settings = load_settings(config)
    stack = Stack(settings, config)
    return Database(
        emulators.firestore_client(stack.firestore_host, settings.project, settings.database)
    )


def test_foreground_up_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    state = config.parent / "state" / "stack.json"
    stack = Stack(load_settings(config), config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrain", "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(
            lambda: (
                state.exists()
                and len(stack.status()) == len(PARTS)
                and all(p.healthy for p in stack.status())
            ),
            timeout=90,
            interval=0.5,
            abort=lambda: proc.poll() is not None,
        ), proc.stderr.read() if proc.stderr and proc.poll() is not None else "not healthy"
        # In the foreground too, a part that dies comes back.
        serving = next(p for p in stack.status() if p.name == "serving")
        assert serving.pid is not None
        os.kill(serving.pid, signal.SIGKILL)
        assert wait_until(
            lambda: all(
                p.healthy and p.pid != serving.pid for p in stack.status() if p.name == "serving"
            ),
            timeout=120,
            interval=0.2,
        ), "the foreground stack did not restart serving"
        pids = [*recorded_pids(config), supervisor_pid(config)]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if state.exists():  # a failure above: stop what it started, by its recorded pids
            stack.down()
    assert proc.returncode == 0
    assert "stopped supervisor, serving" in out
    assert not state.exists()
    assert not [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]


def test_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    port = load_settings(config).local.ports.gatekeeper
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = retrain("up", "--detach", config=config)
    assert result.returncode == 1
    assert f"port {port} for gatekeeper is already in use" in " ".join(result.stderr.split())
    assert "local.ports.gatekeeper" in result.stderr
    assert not (config.parent / "state" / "stack.json").exists()


class BrokenStack(Stack):
    """The real stack plus a part that dies at start, to exercise the failure path."""

    def parts(self):  # type: ignore[no-untyped-def]
        parts = super().parts()
        scheduler = next(p for p in parts if p.name == "scheduler")
        broken = scheduler.__class__(
            name="scheduler",
            port=scheduler.port,
            argv=(
                sys.executable,
                "-c",
                "import sys; print('cannot open the schedule'); sys.exit(3)",
            ),
            url=scheduler.url,
            health_path="/healthz",
            startup_timeout=20,
            hint="this part is broken on purpose",
        )
        return [broken if p.name == "scheduler" else p for p in parts]


def test_part_that_fails_to_start_stops_the_others_and_shows_its_log(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    stack = BrokenStack(load_settings(config), config)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(StackError) as failure:
        stack.up()
    assert failure.value.part == "scheduler"
    assert "scheduler exited" in str(failure.value)
    assert "broken on purpose" in str(failure.value)
    assert failure.value.log is not None
    assert "cannot open the schedule" in failure.value.log
    assert not stack.state_file.exists()
    leftover = {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE
    } - before
    assert not leftover, f"processes left running: {leftover}"
