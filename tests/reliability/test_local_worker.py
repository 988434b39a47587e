"""The local worker's part in single flight: it records its process (so the sweep can tell
whether it lives), and it stops its whole process group if it ever finds its lease taken."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from pipelines.launchers import LocalLauncher
from retrain.ledger import FirestoreLedger, RunRecord
from retrain.localstack.processes import wait_until
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
