"""The task zygote (pipelines.zygote) and the worker's side of it (pipelines.warm_tasks),
with real kfp.local tasks: each forked in a new process, its output, exit code and
environment as a cold task's; a stale or dead zygote; one zygote for concurrent launches;
stopped by its pid."""

# (no `from __future__ import annotations`: kfp reads the components' annotations)
# ruff: noqa: PLC0415, T201 (a component imports in its body: kfp ships only its source)

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kfp import dsl, local
from kfp.dsl import Dataset, Input, Output
from kfp.local import subprocess_task_handler

from pipelines import warm_tasks
from pipelines.local_run import parse_progress
from pipelines.zygote import read_message, send_message
from retrain.config import load_settings
from retrain.localstack import Stack
from retrain.localstack.processes import ProcessRecord, wait_until
from tests.conftest import write_config

pytestmark = pytest.mark.integration

# What these tests' zygotes import: kfp's executor only (the real list takes seconds).
LIGHT = ["kfp.dsl.executor", "kfp.dsl.kfp_config", "kfp.dsl.utils"]
IDLE = 120.0


def _echo(text: str) -> str:
    import json
    import os

    print(f"hello from the task: {text}", flush=True)
    return json.dumps({"pid": os.getpid(), "ppid": os.getppid(),
                       "var": os.environ.get("ZYGOTE_TEST_VAR"), "cwd": os.getcwd()})  # fmt: skip


def _fail(text: str) -> None:
    raise ValueError(text)


def _hang(pid_file: str) -> None:
    import os
    import time
    from pathlib import Path

    Path(pid_file).write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(120)


def _write(rows: int, data: Output[Dataset]) -> None:
    from pathlib import Path

    Path(data.path).write_text("\n".join(str(i) for i in range(rows)), encoding="utf-8")


def _read(data: Input[Dataset]) -> int:
    from pathlib import Path

    return len(Path(data.path).read_text(encoding="utf-8").splitlines())


def _blas_threads() -> str:
    import json

    from threadpoolctl import threadpool_info

    from components.compute import thread_limit

    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    with thread_limit(1):
        inside = blas()
    return json.dumps({"outside": blas(), "inside": inside})


def _op(func: Any) -> Any:
    return dsl.component(func=func, base_image="python:3.11", install_kfp_package=False)


echo, fail, hang, write, read, blas_threads = map(_op, (_echo, _fail, _hang, _write, _read,
                                                         _blas_threads))  # fmt: skip


def _artifacts(rows: int) -> int:
    written = write(rows=rows)
    return read(data=written.outputs["data"]).output  # type: ignore[no-any-return]


artifacts = dsl.pipeline(name="artifacts")(_artifacts)


def _alive(record: dict[str, Any]) -> bool:
    return ProcessRecord(record["pid"], record["create_time"]).alive()


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state folder whose zygote runs these tests' tasks; it is stopped by its pid after."""
    monkeypatch.setattr(subprocess_task_handler, "run_local_subprocess",
                        subprocess_task_handler.run_local_subprocess)  # restored after  # fmt: skip
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "root"), raise_on_error=False)  # fmt: skip
    folder = tmp_path / "state"
    yield folder
    warm_tasks.stop(folder)


def _started(folder: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    record = warm_tasks.ensure(folder, env or dict(os.environ), IDLE, LIGHT)
    assert record is not None
    assert warm_tasks.wait_ready(record, timeout=60), (folder / warm_tasks.LOG).read_text()
    return record


def _forked(folder: Path) -> list[str]:
    log = (folder / warm_tasks.LOG).read_text(encoding="utf-8")
    return [line for line in log.splitlines() if ": task " in line and ": exit" not in line]


def test_each_task_forks_from_the_one_zygote_with_its_output_and_environment(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record = _started(state)
    warm_tasks.install(state, IDLE, LIGHT)
    monkeypatch.setenv("ZYGOTE_TEST_VAR", "an emulator host")
    monkeypatch.chdir(tmp_path)

    first, second = (json.loads(echo(text=f"run {i}").output) for i in range(2))

    assert first["ppid"] == second["ppid"] == record["pid"], "forked by the zygote"
    assert first["pid"] != second["pid"], "a new process per task"
    assert first["var"] == "an emulator host", "the task's environment is the worker's"
    assert first["cwd"] == str(tmp_path)
    assert len(_forked(state)) == 2
    said = capsys.readouterr().out
    assert "    hello from the task: run 0\n" in said, "the task's lines reach the worker's stdout"
    assert [e.status for e in parse_progress(said)] == ["running", "SUCCESS"] * 2
    assert "RuntimeWarning" not in said


def test_a_failing_task_fails_with_its_traceback_and_the_zygote_serves_on(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _started(state)
    warm_tasks.install(state, IDLE, LIGHT)

    fail(text="boom")

    said = capsys.readouterr().out
    assert [e.status for e in parse_progress(said)] == ["running", "FAILURE"]
    assert "ValueError: boom" in said
    assert "Traceback (most recent call last)" in said
    assert json.loads(echo(text="after").output)["var"] is None
    assert len(_forked(state)) == 2


def test_a_task_killed_midway_fails_its_step(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _started(state)
    warm_tasks.install(state, IDLE, LIGHT)
    pid_file = tmp_path / "task.pid"

    def kill_it() -> None:
        assert wait_until(pid_file.exists, timeout=60)
        wait_until(lambda: pid_file.read_text(encoding="utf-8").isdigit(), timeout=10)
        os.kill(int(pid_file.read_text(encoding="utf-8")), signal.SIGKILL)

    killer = threading.Thread(target=kill_it)
    killer.start()
    hang(pid_file=str(pid_file))
    killer.join()

    assert [e.status for e in parse_progress(capsys.readouterr().out)] == ["running", "FAILURE"]
    assert json.loads(echo(text="after").output)["pid"] > 0


def test_artifacts_are_files_as_in_a_cold_run(state: Path, tmp_path: Path) -> None:
    _started(state)
    warm_tasks.install(state, IDLE, LIGHT)

    run = artifacts(rows=7)

    assert run.output == 7
    (written,) = (tmp_path / "root").rglob("write/data")
    assert written.read_text(encoding="utf-8").splitlines()[-1] == "6"
    assert len(_forked(state)) == 2


def test_a_task_gets_the_blas_threads_of_a_new_process_and_its_step_limit(state: Path) -> None:
    """The zygote loads OpenBLAS with one thread (no pool to fork); a task has the threads
    a new process would have, and thread_limit still limits them in a step."""
    record = warm_tasks.ensure(state, dict(os.environ), IDLE, [*LIGHT, "numpy", "threadpoolctl"])
    assert record is not None
    assert warm_tasks.wait_ready(record, timeout=60)
    warm_tasks.install(state, IDLE)

    threads = json.loads(blas_threads().output)

    cold = os.environ.get("OPENBLAS_NUM_THREADS")
    expected = int(cold) if cold else len(os.sched_getaffinity(0))
    assert set(threads["outside"]) == {expected}
    assert set(threads["inside"]) == {1}
    assert len(_forked(state)) == 1


def test_a_zygote_for_other_code_or_environment_is_replaced(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OMP_NUM_THREADS is read when libgomp loads: a task with another value must not run
    in a zygote loaded with the old one. The old one retires, a new one runs the task."""
    old = _started(state)
    warm_tasks.install(state, IDLE, LIGHT)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")

    result = json.loads(echo(text="new").output)

    new = json.loads((state / warm_tasks.RECORD).read_text(encoding="utf-8"))
    assert new["pid"] != old["pid"]
    assert result["ppid"] == new["pid"]
    assert wait_until(lambda: not psutil.pid_exists(old["pid"]) or
                      psutil.Process(old["pid"]).status() == psutil.STATUS_ZOMBIE,
                      timeout=30), "the stale zygote exits"  # fmt: skip


def test_a_stale_request_is_refused_and_the_zygote_retires(state: Path) -> None:
    record = _started(state)
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(record["socket"])
            send_message(sock, {"fingerprint": "other", "argv": [], "env": {}, "cwd": "/"},
                         [write_end])  # fmt: skip
            assert read_message(sock, bytearray()) == {"stale": True}
    finally:
        os.close(read_end)
        os.close(write_end)
    assert wait_until(lambda: not Path(record["socket"]).exists(), timeout=10)
    assert wait_until(lambda: not _alive(record), timeout=30)


def test_without_a_zygote_tasks_run_cold(state: Path) -> None:
    """idle 0 turns the zygote off; the task runs through kfp's own subprocess path."""
    warm_tasks.install(state, 0)

    result = json.loads(echo(text="cold").output)

    assert result["pid"] > 0
    assert not (state / warm_tasks.RECORD).exists(), "no zygote was started"
    assert not (state / warm_tasks.LOG).exists()


def test_a_dead_zygote_is_replaced_and_one_that_cannot_serve_falls_back_to_cold(
    state: Path,
) -> None:
    record = _started(state)
    os.kill(record["pid"], signal.SIGKILL)
    assert wait_until(lambda: not _alive(record), timeout=10)
    warm_tasks.install(state, IDLE, LIGHT)

    assert json.loads(echo(text="again").output)["ppid"] != record["pid"]

    warm_tasks.stop(state)
    forked = len(_forked(state))
    # A zygote that finds a thread after loading refuses to serve: the task runs cold, and
    # no zygote is started again for the same code and environment.
    warm_tasks.install(state, IDLE, [*LIGHT, "tests.functions.threaded"])
    result = json.loads(echo(text="cold").output)
    assert result["pid"] > 0
    assert len(_forked(state)) == forked, "the task ran cold"
    marked = json.loads((state / warm_tasks.RECORD).read_text(encoding="utf-8"))
    assert marked["not_warm"] == marked["fingerprint"]
    assert warm_tasks.ensure(state, dict(os.environ), IDLE) is None
    assert "cannot fork safely here (2 threads" in (state / warm_tasks.LOG).read_text()


def test_concurrent_launches_start_one_zygote(state: Path) -> None:
    records: list[dict[str, Any] | None] = []
    barrier = threading.Barrier(4)

    def launch() -> None:
        barrier.wait()
        records.append(warm_tasks.ensure(state, dict(os.environ), IDLE, LIGHT))

    threads = [threading.Thread(target=launch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({r["pid"] for r in records if r is not None}) == 1
    assert len(records) == 4
    assert warm_tasks.wait_ready(records[0] or {}, timeout=60)
    log = (state / warm_tasks.LOG).read_text(encoding="utf-8")
    assert log.count("listening on") == 1


def test_stop_ends_the_zygote_by_its_pid_and_its_running_task_with_it(
    state: Path, tmp_path: Path
) -> None:
    record = _started(state)
    worker, pid_file = _worker(state, tmp_path)
    try:
        task = _task_of(pid_file)
        assert task.ppid() == record["pid"]

        assert warm_tasks.stop(state)

        assert not _alive(record)
        assert wait_until(lambda: _gone(task), timeout=10)
        assert not Path(record["socket"]).exists()
        assert not (state / warm_tasks.RECORD).exists()
        assert not warm_tasks.stop(state), "nothing left to stop"
        assert worker.wait(timeout=60) == 0, "the worker saw its task fail and went on"
    finally:
        worker.kill()
        worker.wait()


def test_a_worker_that_dies_takes_its_task_with_it(state: Path, tmp_path: Path) -> None:
    """As a dead worker's process group is stopped: the zygote sees the worker's
    connection close and kills the task; it serves on."""
    record = _started(state)
    worker, pid_file = _worker(state, tmp_path)
    try:
        task = _task_of(pid_file)
    finally:
        worker.kill()
        worker.wait()
    assert wait_until(lambda: _gone(task), timeout=10), "the task dies with its worker"
    warm_tasks.install(state, IDLE, LIGHT)
    assert json.loads(echo(text="after").output)["ppid"] == record["pid"]


def test_the_zygote_exits_when_idle(state: Path) -> None:
    record = warm_tasks.ensure(state, dict(os.environ), 1.0, LIGHT)
    assert record is not None
    assert warm_tasks.wait_ready(record, timeout=60)
    assert wait_until(lambda: not _alive(record), timeout=30)
    assert "idle: exiting" in (state / warm_tasks.LOG).read_text(encoding="utf-8")
    assert not Path(record["socket"]).exists()


# A worker of its own: one task that hangs, through the zygote of argv[1].
WORKER = f"""
import sys
from pathlib import Path

from kfp import dsl, local

from pipelines import warm_tasks


def _hang(pid_file: str) -> None:
    import os
    import time
    from pathlib import Path

    Path(pid_file).write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(120)


warm_tasks.install(Path(sys.argv[1]), {IDLE}, {LIGHT!r})
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[3],
           raise_on_error=False)
dsl.component(func=_hang, base_image="python:3.11", install_kfp_package=False)(
    pid_file=sys.argv[2])
"""


def _worker(state: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A worker process whose one task hangs; and the file its task writes its pid to."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    pid_file = tmp_path / "task.pid"
    worker = subprocess.Popen(
        [sys.executable, str(script), str(state), str(pid_file), str(tmp_path / "root2")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return worker, pid_file


def _task_of(pid_file: Path) -> psutil.Process:
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text().isdigit(), 60)
    return psutil.Process(int(pid_file.read_text(encoding="utf-8")))


def _gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_stack_down_stops_the_zygote_of_its_state_folder(tmp_path: Path) -> None:
    """`retrain down` (Stack.down), and so every test fixture's stack, ends the zygote that
    local runs started, by its recorded pid."""
    path = write_config(tmp_path)
    stack = Stack(load_settings(path), path)
    record = _started(stack.state_dir)

    assert stack.down(export=False) == [], "the zygote is not one of the stack's parts"

    assert not _alive(record)
    assert not (stack.state_dir / warm_tasks.RECORD).exists()


def test_a_process_that_started_a_zygote_exits_without_a_resource_warning(state: Path) -> None:
    """The zygote outlives the `retrain run` that started it (it exits when idle): that
    process's exit warns of no "subprocess ... is still running"."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from pipelines import warm_tasks\n"
        f"record = warm_tasks.ensure(Path(sys.argv[1]), dict(os.environ), {IDLE}, {LIGHT!r})\n"
        "assert record is not None and warm_tasks.wait_ready(record, timeout=60)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-X", "dev", "-c", code, str(state)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr, done.stderr
    record = json.loads((state / warm_tasks.RECORD).read_text(encoding="utf-8"))
    assert _alive(record)  # still serving; the fixture stops it by its pid
