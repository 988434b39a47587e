"""The local worker's part in single flight: it records its process (so the sweep can tell
whether it lives), and it stops its whole process group if it ever finds its lease taken;
a worker killed with ``kill -9`` has its process group stopped by the sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from pipelines.launchers import LocalLauncher
from pipelines.local_run import stop_leftovers
from retrain.bus import PubsubBus
from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger, RunRecord
from retrain.localstack import Stack
from retrain.localstack.processes import wait_until
from retrain.service import RetrainService
from retrain.statedb import Database
from tests.conftest import ROOT, unique

pytestmark = pytest.mark.integration


def test_the_local_launcher_tells_a_live_worker_from_a_dead_one(tmp_path: Path) -> None:
    launcher = LocalLauncher(ROOT / "retrain.yaml", tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = {"pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time()}
        run = RunRecord("m", "m-run", "running", worker=me)
        assert launcher.state("m", run) == "running"
        recycled = RunRecord("m", "m-run", "running", worker={**me, "create_time": 1.0})
        assert launcher.state("m", recycled) == "ended", "a recycled pid is not the worker"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert launcher.state("m", run) == "ended"
    assert launcher.state("m", RunRecord("m", "m-run", "gathering")) == "absent"


def test_a_worker_that_finds_its_lease_taken_stops_its_process_group(
    stack: Any, tmp_path: Path, firestore_client: Any
) -> None:
    model = unique("w")
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    raw["models"] = {model: {**raw["models"]["rainfall"], "data_prefix": f"{model}/",
                             "lease_seconds": 1.5}}  # fmt: skip
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    ledger = FirestoreLedger(Database(firestore_client))
    assert ledger.acquire(model, "run-a", ttl=60).acquired
    # The worker's lease keeping, and a child process of its group (as kfp's tasks are).
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        from pipelines.local_run import _keep_lease
        from retrain.config import load_settings
        settings = load_settings(Path({str(config)!r}))
        assert _keep_lease(settings, {model!r}, "run-a")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
        env={**os.environ, **stack.env()}, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        run = ledger.run(model, "run-a")
        assert run is not None
        assert run.worker is not None
        assert run.worker["pid"] == worker.pid  # it recorded itself
        # The lease goes to another run behind the worker's back (its record is not ended,
        # so its next renewal finds it "lost", not "released").
        model_doc = ledger.db.doc("ledger", model)
        model_doc.update({"lease": {"run_id": "run-b", "acquired_at": 0.0, "expires_at": 1e12}})
        assert wait_until(lambda: worker.poll() is not None, timeout=30)
        assert wait_until(lambda: not psutil.pid_exists(child) or _zombie(child), timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()


def _zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


# A worker as the local launcher starts one: it records itself in its run (taking the
# lease's keeping over), then runs a pipeline under kfp.local whose one task naps.
NAPPING_WORKER = """
import sys
from pathlib import Path
from kfp import dsl, local
from pipelines.local_run import _keep_lease
from retrain.config import load_settings

@dsl.component(base_image="python:3.11", install_kfp_package=False)
def nap(seconds: float) -> None:
    import time
    time.sleep(seconds)

@dsl.pipeline
def napping() -> None:
    nap(seconds=120.0)

config, model, root = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
assert _keep_lease(load_settings(config), model, "run-a")
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
napping()
"""


class SubmitsNothing(LocalLauncher):
    """The local launcher's own ``state``; a run it is asked to submit is only recorded."""

    def __init__(self, config: Path, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        self.submitted: list[str] = []

    def submit(self, model: str, run_id: str) -> None:
        self.submitted.append(run_id)


def test_the_sweep_stops_the_tasks_of_a_worker_killed_with_kill_9(
    stack: Stack, tmp_path: Path, firestore_client: Any, storage: Any, emulated: Any
) -> None:
    model = unique("k")
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    raw["models"] = {model: {**raw["models"]["rainfall"], "data_prefix": f"{model}/"}}
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    settings = load_settings(config)
    db = Database(firestore_client)
    ledger = FirestoreLedger(db)
    assert ledger.acquire(model, "run-a", ttl=60).acquired
    script = tmp_path / "worker.py"
    script.write_text(NAPPING_WORKER, encoding="utf-8")
    worker = subprocess.Popen(
        [sys.executable, str(script), str(config), model, str(tmp_path / "outputs")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **stack.env()}, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    tasks: list[psutil.Process] = []
    try:

        def napping() -> bool:
            tasks[:] = [
                p
                for p in psutil.Process(worker.pid).children(recursive=True)
                if "executor_main" in " ".join(p.cmdline())
            ]
            return bool(tasks)

        assert wait_until(
            napping, timeout=120, interval=0.2, abort=lambda: worker.poll() is not None
        )
        run = ledger.run(model, "run-a")
        assert run is not None
        assert run.worker is not None
        assert run.worker["pid"] == worker.pid
        worker.kill()  # kill -9: its tasks are left running on their own
        assert wait_until(lambda: worker.poll() is not None, timeout=10)
        assert all(task.is_running() for task in tasks), "kill -9 left the tasks running"

        launcher = SubmitsNothing(config, tmp_path)
        registry = FirestoreRegistry(db, settings.buckets.models, storage)
        service = RetrainService(settings, ledger, launcher, PubsubBus(settings.project), registry)
        swept = service.sweep()

        assert launcher.submitted, f"the sweep took the model over: {swept.detail}"
        assert wait_until(lambda: all(_gone(task) for task in tasks), timeout=10), (
            "the sweep left the dead worker's tasks running"
        )
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        for task in tasks:  # only if the test failed before the sweep stopped them
            if not _gone(task):
                task.kill()


def test_leftovers_are_killed_only_in_the_dead_workers_group_and_after_it_started() -> None:
    # A leader in a session of its own starts a child, then exits when told: the child is
    # left in the leader's group, as a killed worker's tasks are.
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; "
         "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
         "stdout=subprocess.DEVNULL).pid, "
         "flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert leader.stdout is not None
    child = psutil.Process(int(leader.stdout.readline()))
    record = {"pid": leader.pid, "create_time": psutil.Process(leader.pid).create_time()}
    try:
        assert stop_leftovers(record) == [], "a live worker's group is left alone"
        assert leader.stdin is not None
        leader.stdin.close()  # it exits, and is reaped: its pid is free
        leader.wait(timeout=30)
        assert os.getpgid(child.pid) == leader.pid
        later = {**record, "create_time": child.create_time() + 5}
        assert stop_leftovers(later) == [], "a process older than the worker is not its task"
        with _worker_with_a_task() as (other, task):
            reused = {"pid": other.pid, "create_time": record["create_time"]}
            assert stop_leftovers(reused) == [], "a pid that names another process now"
            assert task.is_running()
        assert child.is_running()
        assert stop_leftovers(record) == [child.pid]
        assert wait_until(lambda: _gone(child), timeout=10)
    finally:
        if leader.poll() is None:
            leader.kill()
        leader.wait()
        for stream in (leader.stdin, leader.stdout):
            if stream is not None:
                stream.close()
        if not _gone(child):
            child.kill()


@contextmanager
def _worker_with_a_task() -> Iterator[tuple[subprocess.Popen[str], psutil.Process]]:
    """A process in a session of its own, and the child it started."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
         "stdout=subprocess.DEVNULL).pid, "
         "flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        yield proc, psutil.Process(int(proc.stdout.readline()))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its group: it and the child it started
        proc.communicate()  # (reaps it, and closes its pipe)


def _gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True
