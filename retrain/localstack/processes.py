"""Start, watch and stop the stack's processes, only ever by the process ids we recorded."""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pipelines.process_starts import record_of, same_start

__all__ = [
    "ProcessRecord",
    "free_ports",
    "http_ok",
    "log_tail",
    "port_in_use",
    "spawn",
    "stop",
    "wait_until",
]


@dataclass(frozen=True)
class ProcessRecord:
    """A process we started. ``create_time`` guards against a recycled pid.

    psutil's ``create_time`` is the process's start, counted from boot, plus the system's
    boot time as the clock says *now*: a clock step (NTP, a resumed VM) moves it by the
    step. So the record keeps the boot time of the moment its times were read, and a
    process is recognised by its start counted from boot (None: read before this field
    existed; compared as before)."""

    pid: int
    create_time: float
    children: tuple[tuple[int, float], ...] = field(default=())
    boot_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(
            pid=int(data["pid"]),
            create_time=float(data["create_time"]),
            children=tuple((int(p), float(t)) for p, t in data.get("children", ())),
            boot_time=None if data.get("boot_time") is None else float(data["boot_time"]),
        )

    def with_children(self) -> ProcessRecord:
        """This record plus the current descendants of the process (e.g. a JVM it forked)."""
        found = dict(self.children)
        proc = _same_process(self.pid, self.create_time, self.boot_time)
        if proc is not None:
            # The children's times in this record's clock (its boot time), as its own.
            shift = 0.0 if self.boot_time is None else self.boot_time - psutil.boot_time()
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    found[child.pid] = child.create_time() + shift
        return ProcessRecord(
            self.pid, self.create_time, tuple(sorted(found.items())), self.boot_time
        )

    def alive(self) -> bool:
        proc = _same_process(self.pid, self.create_time, self.boot_time)
        return proc is not None and not _gone(proc)

    def child(self, pid: int, create_time: float) -> ProcessRecord:
        """The record of one of :attr:`children`."""
        return ProcessRecord(pid, create_time, boot_time=self.boot_time)


def _same_process(pid: int, create_time: float, boot_time: float | None) -> psutil.Process | None:
    """The process ``pid`` if it is still the one we started (``create_time`` read when the
    system's boot time was ``boot_time``), else None."""
    try:
        proc = psutil.Process(pid)
        if not same_start(proc, {"create_time": create_time, "boot_time": boot_time}):
            return None
    except psutil.Error:
        return None
    return proc


# Popen objects of the processes this interpreter started, kept so that they are reaped
# when stopped, and not garbage-collected (with a ResourceWarning) while they still run.
_POPENS: dict[int, subprocess.Popen[bytes]] = {}


def _reap_ended() -> None:
    """Reap the started processes that ended without :func:`stop` (killed from outside, as
    the healing tests do, or crashed): their Popen would otherwise warn at exit that they
    are "still running"."""
    for pid, popen in list(_POPENS.items()):
        if popen.poll() is not None:
            del _POPENS[pid]


atexit.register(_reap_ended)


def spawn(argv: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> ProcessRecord:
    """Start ``argv`` in its own session, with output to ``log``; return its record."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **env},
            start_new_session=True,  # Ctrl-C on `up` reaches us, and we stop parts in order
        )
    _reap_ended()
    _POPENS[proc.pid] = proc
    return ProcessRecord.from_json(record_of(psutil.Process(proc.pid)))


def stop(record: ProcessRecord, timeout: float = 10.0, *, descendants: bool = True) -> list[int]:
    """Terminate the recorded process and (unless ``descendants`` is False) its recorded or
    current descendants.

    Returns the pids that were still running. Nothing else is signalled.
    """
    record = record.with_children() if descendants else record.child(record.pid, record.create_time)
    procs = [
        proc
        for pid, started in ((record.pid, record.create_time), *record.children)
        if (proc := _same_process(pid, started, record.boot_time)) is not None
    ]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    alive = _wait_gone(procs, timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_gone(alive, timeout)
    for proc in procs:
        popen = _POPENS.pop(proc.pid, None)
        if popen is not None:
            popen.wait(timeout=timeout)
    return [proc.pid for proc in procs]


def _gone(proc: psutil.Process) -> bool:
    """Exited: no such process, or a zombie (dead; only its parent's reaping is left, which
    for a process whose parent exited is up to init, however slowly it reaps)."""
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each of ``procs`` exited, at most ``timeout`` seconds; those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        alive = [proc for proc in alive if not _gone(proc)]
        if alive:
            time.sleep(0.02)
    return alive


# free_ports chooses from here up to the kernel's ephemeral range (tests use 10000-19999).
PORTS_FROM = 20000


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free now, from below the kernel's ephemeral range, starting
    at a random one: a port of that range (what binding port 0 gives), once released, can be
    taken by any outgoing connection before a slow server binds it."""
    last = _ephemeral_low() - 1
    span = last - PORTS_FROM + 1
    start = random.randrange(span)  # noqa: S311 (spreads concurrent choosers, not a secret)
    found: list[int] = []
    for offset in range(span):
        port = PORTS_FROM + (start + offset) % span
        if not port_in_use(host, port):
            found.append(port)
            if len(found) == count:
                return found
    raise OSError(f"no {count} free ports on {host} in {PORTS_FROM}-{last}")


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="utf-8")
        return max(int(text.split()[0]), PORTS_FROM + 1000)
    except (OSError, ValueError, IndexError):
        return 32768


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (or holds) ``port``. A port in TIME_WAIT, as one is
    for a minute after its server stopped, is free: our servers bind with SO_REUSEADDR."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def http_ok(url: str, expect: Callable[[int, bytes], bool] | None = None) -> bool:
    """True if ``url`` answers HTTP (by default: any status below 500)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our loopback URL)
            status, body = response.status, response.read(256)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, b""
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return False  # (HTTPException: not HTTP/1, e.g. a gRPC server on the port)
    return expect(status, body) if expect else status < 500


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    interval: float = 0.1,
    abort: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``check`` until it is true or ``timeout`` seconds pass (or ``abort`` is true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if abort is not None and abort():
            return False
        time.sleep(interval)
    return check()


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
