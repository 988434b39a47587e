"""kfp.local tasks started warm: forked from the task zygote (:mod:`pipelines.zygote`).

The local launcher makes sure a zygote runs for the stack's state folder (:func:`ensure`:
started detached if absent or stale, its process recorded in ``zygote.json``, the start
guarded by a lock file so that two launches start one); the worker, ``pipelines.local_run``,
sends each task to it (:func:`install`); ``retrain down`` stops it by its recorded process
(:func:`stop`), and it exits by itself after ``local.task_zygote_idle_seconds`` without a
task. A task that the zygote cannot take (none runs and none can start, a component whose
command is not the plain lightweight one) runs as kfp.local runs it, in a new process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.process_starts import record_of, same_start
from pipelines.zygote import EXIT_NOT_WARM, fingerprint, read_message, send_message

__all__ = ["LOG", "RECORD", "ensure", "install", "run_task", "stop", "wait_ready"]

RECORD = "zygote.json"
LOCK = "zygote.lock"
LOG = "logs/zygote.log"
READY_TIMEOUT = 120.0  # its imports take seconds; far more on a busy machine
# The lightweight component's command, as kfp 2.17 builds it (component_factory) with
# `python3` replaced by the worker's interpreter (subprocess_task_handler): a task runs
# in the zygote only if its command is exactly this, so a change in kfp runs it cold.
_GAP = " " * 25  # kfp's source breaks this line with backslashes inside an f-string
_SCRIPT = (
    "program_path=$(mktemp -d)\n\n"
    'printf "%s" "$0" > "$program_path/ephemeral_component.py"\n'
    f"_KFP_RUNTIME=true python3 -m kfp.dsl.executor_main{_GAP}--component_module_path{_GAP}"
    f'"$program_path/ephemeral_component.py"{_GAP}"$@"\n'
)


def _socket_path(state_dir: Path) -> Path:
    """A new socket path (a unix socket's path has at most 107 bytes)."""
    name = f"zygote-{secrets.token_hex(4)}.sock"
    path = state_dir / name
    if len(os.fsencode(path)) < 100:
        return path
    return Path(tempfile.gettempdir()) / f"retrain-{os.getuid()}-{name}"


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _read(state_dir: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads((state_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record


class _Zygote:
    """The zygote process of a record; its start (:mod:`pipelines.process_starts`) guards
    against a recycled pid.
    (psutil directly, not retrain.localstack: the cloud functions' source holds this
    module, through the launchers, and no local-stack code.)"""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.pid = int(record["pid"])
        self.record = dict(record)

    def process(self) -> Any:
        import psutil  # noqa: PLC0415

        try:
            proc = psutil.Process(self.pid)
            if not same_start(proc, self.record):
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return proc

    def alive(self) -> bool:
        return self.process() is not None

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout``; True if it was running."""
        import psutil  # noqa: PLC0415

        proc = self.process()
        if proc is None:
            return False
        for signal_it in (proc.terminate, proc.kill):
            with contextlib.suppress(psutil.Error):
                signal_it()
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:  # (a zombie counts as gone)
                time.sleep(0.02)
            if not self.alive():
                break
        return True


def _process(record: Mapping[str, Any]) -> _Zygote:
    return _Zygote(record)


def _ask(path: Path, message: Mapping[str, Any], timeout: float = 10.0) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        send_message(sock, message)
        return read_message(sock, bytearray())


def ensure(
    state_dir: Path,
    env: Mapping[str, str],
    idle_seconds: float,
    preload: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """The record of a zygote for ``state_dir`` whose image fits ``env`` (the tasks'
    environment), started detached if none runs; a running one that does not fit is told
    to retire (it exits once its tasks ended). Does not wait until it is ready. None if
    ``idle_seconds`` is 0 or zygotes cannot serve here. ``preload``: the modules it
    imports, if not :data:`pipelines.zygote.PRELOAD`.
    """
    if idle_seconds <= 0 or not hasattr(os, "pidfd_open"):
        return None
    wanted = fingerprint(env)
    for started in _STARTED.values():
        started.poll()  # reaps the ones that exited by themselves
    record = _read(state_dir)  # (written whole by a rename: no lock needed to read it)
    if record is not None and record["fingerprint"] == wanted and _process(record).alive():
        return record
    with _locked(state_dir):
        record = _read(state_dir)
        if record is not None:
            alive = _process(record).alive()
            if alive and record["fingerprint"] == wanted:
                return record
            if record.get("not_warm") == wanted:
                return None  # it could not serve with this code and environment
            if alive:
                with contextlib.suppress(OSError, ValueError):
                    _ask(Path(record["socket"]), {"fingerprint": record["fingerprint"],
                                                  "retire": True})  # fmt: skip
        path = _socket_path(state_dir)
        log = state_dir / LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "pipelines.zygote", "--socket", str(path),
                "--idle-seconds", str(idle_seconds)]  # fmt: skip
        if preload is not None:
            argv += ["--preload", ",".join(preload)]
        with log.open("ab") as out:
            proc = _Detached(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), start_new_session=True,  # (its cwd: the caller's, as a task's)
            )  # fmt: skip
        import psutil  # noqa: PLC0415

        record = {
            **record_of(psutil.Process(proc.pid)),
            "socket": str(path),
            "fingerprint": wanted,
            "log": str(log),
        }
        _write(state_dir, record)
        _STARTED[proc.pid] = proc  # reaped when it exits, if this process still runs
        return record


class _Detached(subprocess.Popen[bytes]):
    """A zygote's process. It outlives the process that started it by design (it exits
    when idle, or when stopped by its pid), so dropping this object while it runs, at the
    starter's exit, is no leak: it is reaped if it ended, and no ResourceWarning is given."""

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.poll()


# The zygotes this process started, kept so that they are reaped when they exit.
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def _write(state_dir: Path, record: Mapping[str, Any]) -> None:
    tmp = state_dir / f"{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    tmp.replace(state_dir / RECORD)


def wait_ready(record: Mapping[str, Any], timeout: float = READY_TIMEOUT) -> bool:
    """Wait until the zygote of ``record`` answers; False if it died or did not in time
    (one that exited as unable to serve here is marked, so that it is not started again
    for the same code and environment)."""
    path = Path(record["socket"])
    process = _process(record)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            with contextlib.suppress(OSError, ValueError):
                answer = _ask(path, {"fingerprint": record["fingerprint"]})
                if answer and answer.get("ok"):
                    return True
        if not process.alive():
            _mark_not_warm(record)
            return False
        time.sleep(0.05)
    return False


def _mark_not_warm(record: Mapping[str, Any]) -> None:
    popen = _STARTED.get(int(record["pid"]))
    if popen is None or popen.wait() != EXIT_NOT_WARM:
        return
    state_dir = Path(record["log"]).parents[1]
    with _locked(state_dir):
        current = _read(state_dir)
        if current is not None and current["pid"] == record["pid"]:
            _write(state_dir, {**current, "not_warm": record["fingerprint"]})


def stop(state_dir: Path) -> bool:
    """Stop the zygote recorded for ``state_dir`` (by its pid) and forget it; True if
    one was running. Its running tasks die with it."""
    with _locked(state_dir):
        record = _read(state_dir)
        (state_dir / RECORD).unlink(missing_ok=True)
    if record is None:
        return False
    stopped = _process(record).stop()
    popen = _STARTED.pop(int(record["pid"]), None)
    if popen is not None:
        popen.wait(timeout=10)
    with contextlib.suppress(OSError):
        Path(record["socket"]).unlink()
    return stopped


# -- the worker's side: a task through the zygote ----------------------------------------


def _task_argv(full_command: list[str]) -> list[str] | None:
    """``full_command`` if it is a plain lightweight component's (``sh -ec SCRIPT SOURCE
    ARGS...`` with kfp's script), else None."""
    if len(full_command) < 4 or full_command[:2] != ["sh", "-ec"]:
        return None
    if full_command[2] != _SCRIPT.replace("python3", sys.executable):
        return None
    return full_command


def run_task(
    state_dir: Path,
    idle_seconds: float,
    full_command: list[str],
    env_vars: Mapping[str, str] | None = None,
    *,
    cold: Callable[..., int] | None = None,
    preload: Sequence[str] | None = None,
) -> int:
    """Run one kfp.local task as ``run_local_subprocess`` does (its output printed line by
    line, then a blank line; its exit code returned), forked from the zygote if one runs
    or can start, else by ``cold`` (kfp's own ``run_local_subprocess``)."""
    env = {**os.environ, **(env_vars or {})}
    argv = _task_argv(full_command)
    if argv is not None:
        for _ in range(2):  # once more if the zygote turned out stale
            record = ensure(state_dir, env, idle_seconds, preload)
            if record is None or not wait_ready(record):
                break
            code = _through(Path(record["socket"]), argv, env, record["fingerprint"])
            if code is not None:
                return code
    if cold is None:
        from kfp.local import subprocess_task_handler  # noqa: PLC0415

        cold = _COLD.get("run", subprocess_task_handler.run_local_subprocess)
    return cold(full_command=full_command, env_vars=dict(env_vars or {}))


def _through(path: Path, argv: list[str], env: Mapping[str, str], wanted: str) -> int | None:
    """The task's exit code, run by the zygote at ``path``; None if it is stale or not
    there (nothing ran)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    try:
        try:
            sock.settimeout(10)
            sock.connect(str(path))
            message = {"fingerprint": wanted, "argv": argv, "env": dict(env), "cwd": os.getcwd()}
            send_message(sock, message, [write_end])
        except OSError:
            return None
        finally:
            os.close(write_end)
        buffer = bytearray()
        sock.settimeout(30)
        try:
            answer = read_message(sock, buffer)
        except (OSError, ValueError):
            answer = None
        if answer is None or answer.get("stale") or "pid" not in answer:
            return None
        sock.settimeout(None)  # the task takes as long as it takes
        # As run_local_subprocess: the task's lines, as they come, then a blank line.
        with open(read_end, encoding=None, closefd=False) as lines:
            for line in iter(lines.readline, ""):
                print(line, end="")  # noqa: T201
        print("\n")  # noqa: T201
        try:
            done = read_message(sock, buffer)
        except (OSError, ValueError):
            done = None
        if done is None or "status" not in done:
            print(f"the task zygote ended before task {answer['pid']} reported its end")  # noqa: T201
            return 1
        return int(done["status"])
    finally:
        os.close(read_end)
        sock.close()


_COLD: dict[str, Callable[..., int]] = {}


def install(state_dir: Path, idle_seconds: float, preload: Sequence[str] | None = None) -> None:
    """Send this process's kfp.local tasks to the zygote of ``state_dir``.

    The hook: kfp.local's ``SubprocessTaskHandler.run`` calls the module function
    ``kfp.local.subprocess_task_handler.run_local_subprocess(full_command, env_vars)`` for
    every task; it is replaced (in this process only, the worker) by :func:`run_task`,
    which keeps the original as its cold path. Installing twice keeps the first original.
    """
    from kfp.local import subprocess_task_handler  # noqa: PLC0415

    original = _COLD.setdefault("run", subprocess_task_handler.run_local_subprocess)

    def run_local_subprocess(
        full_command: list[str], env_vars: dict[str, str] | None = None
    ) -> int:
        return run_task(
            state_dir, idle_seconds, full_command, env_vars, cold=original, preload=preload
        )

    subprocess_task_handler.run_local_subprocess = run_local_subprocess
