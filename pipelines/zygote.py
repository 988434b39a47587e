"""The task zygote: a warm interpreter that kfp.local's tasks are forked from.

A kfp.local task is a new Python process that imports pandas, scikit-learn, scipy, pyarrow
and the Google clients (seconds per task) to run a step that may take a fraction of that.
``python -m pipelines.zygote`` imports them once, then listens on a unix socket. Each
request is one task (its argv, environment and working folder, and the file descriptor its
output goes to, passed with SCM_RIGHTS); the zygote forks, and the child runs the task
exactly as the lightweight component's command would (it writes the component's source to
``ephemeral_component.py`` and runs ``kfp.dsl.executor_main`` as ``__main__``), so each
task still reads its inputs and writes its outputs as artifacts. The zygote sends back
the task's pid, then its exit status. The worker's side is :mod:`pipelines.warm_tasks`.

Forking is safe because the zygote holds no threads and no clients, and never enters an
OpenMP region: it loads OpenBLAS with one thread (each child sets its BLAS threads back
to what a cold process would start with) and jemalloc without its background thread, and
checks that it is one thread before it serves. Its loop is single-threaded: a selector
over the listening socket, each task's connection (the client hanging up kills the task)
and each child's pidfd (readable when the child exits); no signal handlers.

It serves only requests whose fingerprint (:func:`fingerprint`: the project's source
files, the installed packages, the environment variables read at import time) is its
own: a request with another one is answered ``stale`` and the zygote retires (it stops
listening, and exits once its running tasks ended). It exits by itself after
``--idle-seconds`` without a task, or when its socket is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.compute import available_cpus

__all__ = [
    "EXECUTOR_MODULE",
    "PRELOAD",
    "fingerprint",
    "main",
    "read_message",
    "send_message",
]

EXECUTOR_MODULE = "kfp.dsl.executor_main"
# What the tasks import (measured with `python -X importtime` on each step): the steps'
# cores, the clients they make, and kfp's executor. Not the components' KFP wrappers:
# a task runs only the function's source.
PRELOAD = (
    "kfp.dsl.executor",  # (executor_main's imports: a task runs it as __main__)
    "kfp.dsl.kfp_config",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow.parquet",
    "sklearn.ensemble",
    "threadpoolctl",
    "google.cloud.storage",
    "google.cloud.pubsub_v1",
    "google.cloud.firestore",
    "components.preprocess.preprocessing",
    "components.train.training",
    "components.evaluate.evaluation",
    "components.evaluate.report",
    "components.runs",
    "pipelines.runtime",
    "retrain.data_objects",
    "retrain.statedb",
    "retrain.bus",
    "retrain.gatekeeper.registry",
)
# Environment variables that a library reads when it loads, not when it runs: a task
# whose environment differs in one of these must not run in this zygote's image.
_LOAD_TIME_PREFIXES = (
    "PYTHON", "OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_", "BLIS_", "NUMEXPR_", "ARROW_",
    "JE_", "LD_", "MALLOC_", "SKLEARN_", "GRPC_",
)  # fmt: skip
_PER_TASK = ("PYTHONUNBUFFERED",)  # set up anew in each child
# Set in the zygote only, while it imports: no BLAS thread pool, no jemalloc thread.
_WHILE_LOADING = {"OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false"}
_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("components", "pipelines", "retrain")
EXIT_NOT_WARM = 3  # cannot serve this code here (an import failed, threads after loading)


def fingerprint(env: Mapping[str, str]) -> str:
    """What the zygote's image depends on: the project's modules (mtime and size of each
    ``.py`` file of components/, pipelines/, retrain/), the interpreter, the installed
    packages (kfp's version, and site-packages' mtime, which an install changes) and the
    load-time variables of ``env``."""
    from importlib import metadata  # noqa: PLC0415

    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\0{metadata.version('kfp')}\0".encode())
    import kfp  # noqa: PLC0415 (where the installed packages are)

    site = Path(kfp.__file__).resolve().parents[1]
    digest.update(f"{site}\0{site.stat().st_mtime_ns}\0".encode())
    for package in _PACKAGES:
        for path in sorted((_ROOT / package).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    for name in sorted(env):
        if name.startswith(_LOAD_TIME_PREFIXES) and name not in _PER_TASK:
            digest.update(f"{name}={env[name]}\0".encode())
    return digest.hexdigest()[:32]


# -- the wire: one JSON object per line, the first one may carry file descriptors ------


def send_message(sock: socket.socket, message: Mapping[str, Any], fds: Iterable[int] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    fds = list(fds)
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def read_message(sock: socket.socket, buffer: bytearray, fds: list[int] | None = None) -> Any:
    """The next JSON line from ``sock`` (None at its end); file descriptors that came with
    it are appended to ``fds`` (when given)."""
    while b"\n" not in buffer:
        if fds is not None:
            data, received, _, _ = socket.recv_fds(sock, 65536, 4)
            fds.extend(received)
        else:
            data = sock.recv(65536)
        if not data:
            return None
        buffer.extend(data)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


# -- the zygote ------------------------------------------------------------------------


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _load(modules: Iterable[str]) -> None:
    import importlib  # noqa: PLC0415

    forced = {k: v for k, v in _WHILE_LOADING.items() if k not in os.environ}
    os.environ.update(forced)
    os.environ["_KFP_RUNTIME"] = "true"  # kfp.dsl imports what a task's kfp imports
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        for name in forced:
            del os.environ[name]
        del os.environ["_KFP_RUNTIME"]


@dataclass
class _Task:
    pid: int
    pidfd: int
    conn: socket.socket


@dataclass(frozen=True)
class _Forked:
    """What a forked child takes from the loop: its request, output and connection."""

    request: Mapping[str, Any]
    out: int
    conn: socket.socket


@dataclass
class _Zygote:
    path: Path
    fingerprint: str
    idle_seconds: float
    listener: socket.socket | None = None
    inode: int = 0
    tasks: dict[int, _Task] = field(default_factory=dict)  # by pidfd
    last_active: float = field(default_factory=time.monotonic)
    selector: Any = None

    def say(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} zygote {os.getpid()}: {text}", flush=True)  # noqa: T201

    def listen(self) -> None:
        old = os.umask(0o077)  # only this user may connect (a request runs code)
        try:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(16)
        self.inode = self.path.stat().st_ino

    def ours(self) -> bool:
        """Whether the socket file is still the one this zygote bound."""
        try:
            return self.path.stat().st_ino == self.inode
        except OSError:
            return False

    def busy(self) -> bool:
        """Listening, or with tasks running."""
        return self.listener is not None or bool(self.tasks)

    def retire(self) -> None:
        """Stop listening; the running tasks go on to their end."""
        if self.listener is None:
            return
        if self.selector is not None:
            self.selector.unregister(self.listener)
        if self.ours():
            self.path.unlink(missing_ok=True)
        self.listener.close()
        self.listener = None

    def serve(self) -> _Forked | None:
        """Serve until idle or retired and every task ended; in a forked child, its task."""
        import selectors  # noqa: PLC0415

        if self.listener is None:
            return None
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        try:
            while self.busy():
                if self.listener is not None and not self.tasks:
                    if time.monotonic() - self.last_active >= self.idle_seconds:
                        self.say("idle: exiting")
                        self.retire()
                    elif not self.ours():
                        self.say("its socket is gone: exiting")
                        self.retire()
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data == "accept" and self.listener is not None:
                        forked = self._accept()
                        if forked is not None:
                            return forked
                    elif key.data == "exit":
                        self._reap(self.tasks.pop(key.fd))
                    elif key.data == "hangup":
                        self._hangup(key.fileobj)
        finally:
            self.selector.close()  # (in a forked child: its copy)
            self.selector = None
        return None

    def _accept(self) -> _Forked | None:
        import selectors  # noqa: PLC0415

        assert self.listener is not None  # noqa: S101
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return None
        self.last_active = time.monotonic()
        conn.settimeout(10)
        fds: list[int] = []
        try:
            request = self._request(conn, fds)
        except (OSError, ValueError):
            request = None
        if request is None:
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        (out,) = fds
        pid = os.fork()
        if pid == 0:
            return _Forked(request, out, conn)
        os.close(out)
        pidfd = os.pidfd_open(pid)
        self.tasks[pidfd] = _Task(pid, pidfd, conn)
        self.selector.register(pidfd, selectors.EVENT_READ, "exit")
        self.selector.register(conn, selectors.EVENT_READ, "hangup")
        with contextlib.suppress(OSError):
            send_message(conn, {"pid": pid})
        self.say(f"task {pid}: {_describe(request['argv'])}")
        return None

    def _request(self, conn: socket.socket, fds: list[int]) -> Mapping[str, Any] | None:
        """The task request on ``conn``; None for anything else (answered here)."""
        request = read_message(conn, bytearray(), fds)
        if request is None:
            return None
        if request.get("fingerprint") != self.fingerprint:
            send_message(conn, {"stale": True})
            self.say("a request for other code or environment: retiring")
            self.retire()
            return None
        if "argv" not in request:  # a ping, or "retire"
            send_message(conn, {"ok": True, "pid": os.getpid()})
            if request.get("retire"):
                self.say("asked to retire")
                self.retire()
            return None
        if len(fds) != 1:
            self.say("a task request without its output's file descriptor: refused")
            return None
        return dict(request)

    def _hangup(self, conn: socket.socket) -> None:
        """The client went away (its worker died or was stopped): so does its task."""
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if data:
            return
        self.selector.unregister(conn)
        for task in self.tasks.values():
            if task.conn is conn:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(task.pid, signal.SIGKILL)
                self.say(f"task {task.pid}: its client hung up; killed")

    def _reap(self, task: _Task) -> None:
        self.selector.unregister(task.pidfd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(task.conn)
        _, status = os.waitpid(task.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            task.conn.settimeout(5)
            send_message(task.conn, {"status": code})
        task.conn.close()
        os.close(task.pidfd)
        self.last_active = time.monotonic()
        self.say(f"task {task.pid}: exit {code}")

    def close_in_child(self) -> None:
        """In a forked child: close what belongs to the zygote (its selector is closed)."""
        if self.listener is not None:
            self.listener.close()
        for task in self.tasks.values():
            os.close(task.pidfd)
            task.conn.close()


def _describe(argv: list[str]) -> str:
    if "--function_to_execute" in argv:
        return argv[argv.index("--function_to_execute") + 1]
    return " ".join(argv)[:80]


# -- the child: one task ---------------------------------------------------------------


def _run_child(forked: _Forked, zygote: _Zygote, parent: int) -> int:
    """In the forked child: become the task's process, run it, return its exit code."""
    import ctypes  # noqa: PLC0415

    with contextlib.suppress(OSError, AttributeError):  # dies with the zygote (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
    zygote.close_in_child()
    forked.conn.close()
    os.dup2(forked.out, 1)
    os.dup2(forked.out, 2)
    os.close(forked.out)
    request = forked.request
    env = dict(request["env"])
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    _fresh_process(env)
    return _run_task(list(request["argv"]))


def _fresh_process(env: Mapping[str, str]) -> None:
    """What a new interpreter would start with, where the zygote's differs."""
    import io  # noqa: PLC0415
    import random  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    encoding = sys.stdout.encoding if sys.stdout else "utf-8"
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding=encoding, write_through=unbuffered
    )
    stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding=encoding, errors="backslashreplace",
        line_buffering=True,
    )  # fmt: skip
    sys.stdout, sys.stderr = stdout, stderr
    tempfile.tempdir = None  # read $TMPDIR of the task's environment
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # the zygote's seed is every child's otherwise
    if _BLAS:  # the BLAS threads a new process would have
        blas = env.get("OPENBLAS_NUM_THREADS")
        threads = int(blas) if blas and blas.isdigit() else available_cpus()
        for library in _BLAS:
            with contextlib.suppress(Exception):
                library.set_num_threads(threads)


# The BLAS libraries the zygote loaded (threadpoolctl's controllers of them, found once:
# finding them takes 0.1 s or more per process).
_BLAS: list[Any] = []


def _find_blas() -> None:
    """Find the thread pools once, here: the children inherit what was found (the steps'
    thread limits use the same controller, components.compute.threadpools)."""
    compute = sys.modules.get("components.compute")
    if compute is not None:
        controller = compute.threadpools()
    elif "threadpoolctl" in sys.modules:
        controller = sys.modules["threadpoolctl"].ThreadpoolController()
    else:
        return
    _BLAS[:] = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]


def _run_task(argv: list[str]) -> int:
    """Run ``sh -ec SCRIPT SOURCE ARGS...`` of a lightweight component, in this process:
    write SOURCE to ``$program_path/ephemeral_component.py`` and run the executor."""
    import runpy  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import traceback  # noqa: PLC0415

    source, args = argv[3], argv[4:]
    program_path = Path(tempfile.mkdtemp())
    module = program_path / "ephemeral_component.py"
    module.write_bytes(os.fsencode(source))
    os.environ["_KFP_RUNTIME"] = "true"
    sys.path[0] = os.getcwd()  # as `python -m` sets it
    sys.argv = ["-m", "--component_module_path", str(module), *args]
    sys.modules.pop(EXECUTOR_MODULE, None)  # not imported yet in a new `python -m`
    code = 0
    try:
        runpy.run_module(EXECUTOR_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:  # noqa: BLE001 (as the interpreter reports any uncaught one)
        tb = exc.__traceback__
        traceback.print_exception(type(exc), exc, tb.tb_next if tb else None)  # from runpy on
        code = 1
    # What the interpreter does at exit, short of tearing its modules down.
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]  # (waits for non-daemon threads)
    import atexit  # noqa: PLC0415

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # noqa: T201 (as the interpreter prints sys.exit("text"))
    return 1


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.zygote --socket PATH [--idle-seconds S] [--preload M,...]``"""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="The warm interpreter kfp.local tasks fork from.")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on.")
    parser.add_argument(
        "--idle-seconds", type=float, default=600.0, help="Exit after this long without a task."
    )
    parser.add_argument(
        "--preload", default=",".join(PRELOAD), help="Modules to import first, comma-separated."
    )
    args = parser.parse_args(argv)
    own = fingerprint(os.environ)
    started = time.monotonic()
    zygote = _Zygote(args.socket, own, args.idle_seconds)
    try:
        _load(m for m in args.preload.split(",") if m)
    except Exception as exc:  # noqa: BLE001 (any: a task run cold then says what it is)
        zygote.say(f"cannot load: {type(exc).__name__}: {exc}; not serving")
        sys.exit(EXIT_NOT_WARM)
    _find_blas()
    import gc  # noqa: PLC0415

    gc.collect()
    gc.freeze()  # a child's collections skip what it inherits: no copy-on-write of all of it
    if _threads() != 1 or not hasattr(os, "pidfd_open"):
        zygote.say(f"cannot fork safely here ({_threads()} threads after loading); not serving")
        sys.exit(EXIT_NOT_WARM)
    zygote.listen()
    zygote.say(f"loaded in {time.monotonic() - started:.1f} s; listening on {args.socket}")
    me = os.getpid()
    try:
        forked = zygote.serve()
    finally:
        if os.getpid() == me:
            zygote.retire()
    if forked is not None:  # a forked child: its task, and its end
        os._exit(_run_child(forked, zygote, me))


if __name__ == "__main__":
    main()
