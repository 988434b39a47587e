"""The local adapter of the ``PipelineLauncher`` port, and :func:`launcher_for`.

The local adapter runs the pipeline with kfp.local in a worker process
(``python -m pipelines.local_run``), so the caller never blocks on the pipeline unless it
asks to follow it. The port is in :mod:`pipelines.launch`; the Vertex AI and Kubeflow
adapters in :mod:`pipelines.vertex_launcher` and :mod:`pipelines.kfp_launcher`;
``backend`` in retrain.yaml picks one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import warm_tasks
from pipelines.byo import ComponentMismatch, ContainerComponentLocally, pipeline_for
from pipelines.launch import JobState, PipelineLauncher
from pipelines.local_run import (
    LOG_FILE,
    RESULT_FILE,
    RunResult,
    parse_progress,
    stop_leftovers,
    worker_alive,
)
from retrain.ledger import new_run_id

if TYPE_CHECKING:
    from rich.console import Console

    from retrain.config import Settings
    from retrain.ledger import FirestoreLedger, RunRecord
    from retrain.localstack import Stack

__all__ = [
    "LocalLauncher",
    "LocalRunError",
    "launcher_for",
    "local_environment",
    "run_and_follow",
]

EMULATOR_VARIABLES = ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "FIRESTORE_EMULATOR_HOST")
DEFAULT_IMAGE = "retrain-components:latest"


class LocalRunError(RuntimeError):
    """A local run that could not start; the message says what to do."""


def _worker(
    config: Path, model: str, run_id: str, workdir: Path, image: str, *extra: str
) -> list[str]:
    """The command line of the run worker (``python -m pipelines.local_run``)."""
    return [
        sys.executable, "-m", "pipelines.local_run", "--config", str(config), "--model", model,
        "--run-id", run_id, "--workdir", str(workdir), "--image", image, *extra,
    ]  # fmt: skip


class LocalLauncher:
    """Runs each pipeline with kfp.local in a detached worker (``pipelines.local_run``).

    The worker records its own process (pid and start time) in the run's record, in the
    commit that extends its lease: :meth:`state` looks at that process.
    """

    def __init__(
        self,
        config_path: Path,
        state_dir: Path,
        image: str = DEFAULT_IMAGE,
        zygote_idle_seconds: float = 0.0,
    ) -> None:
        self.config_path = config_path
        self.state_dir = state_dir
        self.image = image
        self.zygote_idle_seconds = zygote_idle_seconds
        self._workers: list[subprocess.Popen[bytes]] = []

    def submit(self, model: str, run_id: str) -> None:
        self._workers = [w for w in self._workers if w.poll() is None]  # reap the finished
        # The task zygote starts importing now, while the worker waits out the coalescing.
        warm_tasks.ensure(self.state_dir, os.environ, self.zygote_idle_seconds)
        workdir = self.state_dir / "runs" / run_id
        workdir.mkdir(parents=True, exist_ok=True)
        argv = _worker(self.config_path, model, run_id, workdir, self.image, "--from-ledger")
        with (workdir / LOG_FILE).open("wb") as log:
            self._workers.append(
                subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # outlives the request that started it
                )
            )

    def state(self, model: str, run: RunRecord) -> JobState:
        """``running`` while the worker process that recorded itself lives. Once it is
        dead, what it left of its process group (kfp.local tasks) is killed first, so that
        nothing of the run goes on once the sweep takes the model over."""
        del model
        if not run.worker:
            return "absent"
        if worker_alive(run.worker):
            return "running"
        stop_leftovers(run.worker)
        return "ended"

    def scheduled(self, model: str, run_id: str) -> bool:
        """Never: locally a schedule is a tick through the ledger, not a pipeline schedule."""
        del model, run_id
        return False


def launcher_for(
    settings: Settings, config_path: Path, ledger: FirestoreLedger
) -> PipelineLauncher:
    """The launcher that ``backend`` in retrain.yaml names. The cloud launchers pass the
    text of ``config_path`` to the pipeline, as the local worker does."""
    if settings.backend == "vertex":
        from pipelines.vertex_launcher import VertexLauncher  # noqa: PLC0415

        return VertexLauncher(settings, config_path.read_text(encoding="utf-8"), ledger)
    if settings.backend == "kfp":
        from pipelines.kfp_launcher import KfpLauncher  # noqa: PLC0415

        return KfpLauncher(settings, config_path.read_text(encoding="utf-8"), ledger)
    local = settings.local
    return LocalLauncher(
        config_path, local.state_dir, zygote_idle_seconds=local.task_zygote_idle_seconds
    )


def local_environment(stack: Stack) -> dict[str, str]:
    """The stack's emulators if it runs; else the caller's own environment must name them."""
    if stack.running():
        return {**os.environ, **stack.env()}
    if all(os.environ.get(v) for v in EMULATOR_VARIABLES):
        return dict(os.environ)
    raise LocalRunError(
        f"the local stack is not running from {stack.state_dir}: start it with "
        "`retrain up --detach` (or set PUBSUB_EMULATOR_HOST and STORAGE_EMULATOR_HOST)"
    )


def _check_pipeline(stack: Stack, model: str, image: str) -> None:
    try:
        pipeline_for(stack.settings, model, image, local_run=True)
    except (ComponentMismatch, ContainerComponentLocally) as exc:
        raise LocalRunError(str(exc)) from exc


def run_and_follow(
    stack: Stack,
    model: str,
    data_uris: list[str],
    *,
    reason: str = "manual",
    run_id: str | None = None,
    request_id: str | None = None,
    image: str = "retrain-components:latest",
    console: Console | None = None,
    timeout: float = 3600.0,
    hold_lease: bool = False,
) -> RunResult:
    """Run the pipeline in a worker process and follow it step by step until it ends.
    ``hold_lease``: run ``run_id`` holds the model's lease (the caller took it); the worker
    records itself and keeps the lease while it runs."""
    _check_pipeline(stack, model, image)
    env = local_environment(stack)
    run_id = run_id or new_run_id(model)
    workdir = stack.state_dir / "runs" / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    argv = _worker(
        stack.config_path, model, run_id, workdir, image,
        "--request-id", request_id or f"manual-{run_id}", "--reason", reason,
    )  # fmt: skip
    for uri in data_uris:
        argv += ["--data", uri]
    if hold_lease:
        argv.append("--hold-lease")
    # The task zygote imports the steps' libraries while the worker starts.
    idle = stack.settings.local.task_zygote_idle_seconds
    warm_tasks.ensure(stack.state_dir, env, idle)
    log = workdir / LOG_FILE
    with log.open("wb") as out:
        worker = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    shown = 0
    started: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    with _status(console, f"run {run_id}: starting") as status:
        while True:
            finished = worker.poll() is not None
            events = list(parse_progress(log.read_text(encoding="utf-8", errors="replace")))
            for event in events[shown:]:
                if event.status == "running":
                    started[event.task] = time.monotonic()
                    status.update(f"run {run_id}: {event.task}")
                elif console is not None:
                    took = time.monotonic() - started.get(event.task, time.monotonic())
                    mark = "[green]ok[/]" if event.status == "SUCCESS" else "[red]FAILED[/]"
                    console.print(f"  {event.task}: {mark} ({took:.1f} s)")
            shown = len(events)
            if finished:
                break
            if time.monotonic() > deadline:
                worker.kill()
                worker.wait()
                raise LocalRunError(f"run {run_id} did not end within {timeout:g} s; see {log}")
            time.sleep(0.2)
    result_file = workdir / RESULT_FILE
    if not result_file.exists():
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        raise LocalRunError(f"the run worker exited {worker.returncode} without a result:\n{tail}")
    return RunResult(**json.loads(result_file.read_text(encoding="utf-8")))


class _NoStatus:
    def __enter__(self) -> _NoStatus:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, _: str) -> None:
        return None


def _status(console: Console | None, text: str) -> _NoStatus:
    if console is None:
        return _NoStatus()
    return console.status(text)  # type: ignore[return-value]
