"""Run the pipeline on this machine with kfp.local, as the local ``PipelineLauncher`` does.

``python -m pipelines.local_run`` is the worker process: it runs one pipeline under
``SubprocessRunner(use_venv=False)``, with kfp's log on its stdout, and writes
``result.json`` into its run folder when the run ends. ``retrain run`` starts it and
follows that log to show progress step by step; the trigger functions start it detached.
The storage and Pub/Sub clients in the tasks find the emulators (or Google Cloud) by
their usual environment variables, which the tasks inherit from this process.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.process_starts import record_of, same_start, since_boot, started_since_boot
from retrain.config import Settings, load_settings
from retrain.options import ConfigOption

__all__ = [
    "RESULT_FILE",
    "RunResult",
    "StepEvent",
    "parse_progress",
    "run_locally",
    "stop_leftovers",
    "worker_alive",
]

RESULT_FILE = "result.json"
LOG_FILE = "run.log"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '(?P<task>[^']+)'")
_FINISHED = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)")


@dataclass(frozen=True)
class RunResult:
    run_id: str
    model: str
    state: str  # "succeeded" | "failed"
    seconds: float
    outputs: str  # where kfp.local keeps the task artifacts
    report_uri: str | None
    message_id: str | None
    report: dict[str, Any] | None
    error: str | None = None
    failed_step: str | None = None


@dataclass(frozen=True)
class StepEvent:
    task: str
    status: str  # "running" | "SUCCESS" | "FAILURE"


def parse_progress(log_text: str) -> Iterator[StepEvent]:
    """The task starts and ends in a kfp.local log, in order."""
    for line in _ANSI.sub("", log_text).splitlines():
        if started := _STARTED.search(line):
            yield StepEvent(started["task"], "running")
        elif finished := _FINISHED.search(line):
            yield StepEvent(finished["task"], finished["status"])


def prepare(settings: Settings, model: str, image: str, workdir: Path) -> Any:
    """What a run needs before its data: the pipeline function of ``model``, kfp.local's
    runner keeping the artifacts under ``workdir``, and the tasks sent to the task zygote
    (started at the first task if none runs). About a second of imports, so the worker
    does this while the coalescing window passes."""
    from kfp import local  # noqa: PLC0415 (kfp import costs 0.5 s)

    from components import runs  # noqa: F401, PLC0415 (imported now: the run reads its report)
    from pipelines import warm_tasks  # noqa: PLC0415
    from pipelines.byo import pipeline_for  # noqa: PLC0415

    pipeline = pipeline_for(settings, model, image, local_run=True)
    warm_tasks.install(settings.local.state_dir, settings.local.task_zygote_idle_seconds)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "outputs"),
        raise_on_error=False,
    )
    return pipeline


def run_locally(
    settings: Settings,
    config_text: str,
    *,
    model: str,
    data_uris: list[str],
    run_id: str,
    request_id: str,
    reason: str,
    workdir: Path,
    image: str,
    prepared: Future[Any] | None = None,
) -> RunResult:
    """Run the pipeline to its end under kfp.local and read back the report it published.
    ``prepared``: :func:`prepare`'s result for the same model, image and workdir, if it
    was started earlier."""
    from components.runs import RunContext, read_failure, read_report, report_uri  # noqa: PLC0415

    run = RunContext.parse(model, run_id, request_id, reason)
    pipeline = prepare(settings, model, image, workdir) if prepared is None else prepared.result()
    outputs = workdir / "outputs"
    started = time.monotonic()
    with warnings.catch_warnings():
        # kfp warns for any base_image without "python" in its name; ours is the project's
        # image, which has Python, and SubprocessRunner does not use images anyway.
        warnings.filterwarnings("ignore", message=".*base_image.*", category=RuntimeWarning)
        pipeline(
            model=model,
            data_uris=data_uris,
            request_id=request_id,
            reason=reason,
            run_id=run_id,
            config_yaml=config_text,
        )
    seconds = time.monotonic() - started
    uri = report_uri(settings, run)
    kept = read_report(settings, run)
    report, message_id = kept if kept is not None else (None, None)
    state = str(report["status"]) if report else "failed"
    failure = read_failure(settings, run) if state == "failed" else None
    error = (report or {}).get("error") or (failure or {}).get("error")
    if state == "failed" and error is None:
        error = "the run failed before it could report; see the run log"
    return RunResult(
        run_id=run_id,
        model=model,
        state=state,
        seconds=seconds,
        outputs=str(outputs),
        report_uri=uri if report else None,
        message_id=message_id,
        report=report,
        error=error,
        failed_step=(report or {}).get("failed_step") or (failure or {}).get("step"),
    )


def worker_alive(worker: dict[str, float]) -> bool:
    """Whether the worker process that recorded ``{"pid", "create_time"}`` still runs (a
    recycled pid does not count: its start time differs)."""
    import psutil  # noqa: PLC0415

    try:
        proc = psutil.Process(int(worker["pid"]))
        if not same_start(proc, worker):
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def stop_leftovers(worker: dict[str, float]) -> list[int]:
    """Kill what a dead worker left running: its kfp.local tasks, which a worker killed
    with ``kill -9`` leaves to run on (and report) beside the run that takes over.

    The worker runs in a session of its own, so its process group's id is its pid. A
    process is killed only if it is in that group and session and started after the
    worker; and only while the worker's pid names the dead worker (a zombie) or nothing
    (Linux gives no new process a pid that is still some group's id). If the pid names
    another process (the worker was reaped and its pid reused), nothing is killed. A
    reused pid that leads a new group after the old group emptied would need the pid space
    to wrap in the minutes between the worker's death and the sweep that finds it.

    Args:
        worker: ``{"pid", "create_time"}`` as the worker recorded itself in its run.

    Returns:
        The pids that were killed.
    """
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    try:
        leader, started = int(worker["pid"]), since_boot(worker)
    except (KeyError, TypeError, ValueError):
        return []
    if worker_alive(worker) or _other_process(leader, worker):
        return []
    killed = []
    for proc in psutil.process_iter():
        try:
            if (
                proc.pid == leader
                or os.getpgid(proc.pid) != leader
                or os.getsid(proc.pid) != leader
            ):
                continue
            if started_since_boot(proc, worker) < started:
                continue
            os.kill(proc.pid, signal.SIGKILL)
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or not ours
        killed.append(proc.pid)
    return killed


def _other_process(pid: int, worker: dict[str, float]) -> bool:
    """Whether ``pid`` names a process other than the one ``worker`` records."""
    import psutil  # noqa: PLC0415

    try:
        return not same_start(psutil.Process(pid), worker)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell: assume it is not ours


def _ledger(settings: Settings) -> Any:
    from retrain import statedb  # noqa: PLC0415
    from retrain.ledger import FirestoreLedger  # noqa: PLC0415

    return FirestoreLedger(statedb.database(settings))


def _from_ledger(settings: Settings, model: str, run_id: str) -> tuple[list[str], str, str]:
    """Wait out the rest of the coalescing window (it opened when the run took the lease),
    then take every waiting event of the model."""
    from retrain.data_objects import gather  # noqa: PLC0415

    ledger = _ledger(settings)
    record = ledger.run(model, run_id)
    since = record.created_at if record is not None else None
    inputs = gather(settings, ledger, model, run_id, since=since)
    return inputs.data_uris, inputs.request_id, inputs.reason


def _keep_lease(settings: Settings, model: str, run_id: str) -> bool:
    """Record this worker's process in the run, and extend the lease to lease_seconds, in
    one commit (kick took it only for the gathering); then renew it every third of that
    while this worker lives. False if this run no longer holds the lease: it must not run.

    The sweep takes over a lease only from a run whose worker is dead, so a renewal finds
    the lease lost only if the run was released (its report arrived: renewing stops) or
    its record was lost; then this worker stops its whole process group, pipeline tasks
    included, rather than run beside another run.
    """
    import logging  # noqa: PLC0415
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    ttl = settings.models[model].lease_seconds
    ledger = _ledger(settings)
    me = record_of(psutil.Process())
    if ledger.attach(model, run_id, ttl, {"worker": me}) != "held":
        return False

    def renew() -> None:
        while not threading.Event().wait(ttl / 3):
            try:
                renewal = ledger.renew(model, run_id, ttl)
            except Exception:  # a storage hiccup: try again at the next third
                logging.getLogger(__name__).exception("run %s: renewing its lease failed", run_id)
                continue
            if renewal == "released":
                return
            if renewal == "lost":
                logging.getLogger(__name__).error(
                    "run %s lost the lease of %s while running: stopping", run_id, model
                )
                os.killpg(os.getpgrp(), signal.SIGTERM)
                return

    threading.Thread(target=renew, name="lease-renewal", daemon=True).start()
    return True


def _release(settings: Settings, model: str, run_id: str, exc: Exception) -> None:
    """This run will not train: free the model's lease (what it gathered waits again), and
    ask for a sweep if events wait, so that the next run starts now rather than at the
    next event or the scheduled sweep."""
    from retrain.bus import PubsubBus  # noqa: PLC0415
    from retrain.ledger import LostLease  # noqa: PLC0415
    from retrain.messages import ALL_MODELS, ScheduleMessage  # noqa: PLC0415

    if isinstance(exc, LostLease):
        return  # the run is over already
    ledger = _ledger(settings)
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, LookupError):
        ledger.finish(model, run_id, "abandoned", error)
    else:
        ledger.abandon(model, run_id, error)
    if ledger.has_pending(model):
        sweep = ScheduleMessage(model=ALL_MODELS, reason="sweep")
        PubsubBus(settings.project).publish(settings.topics.retrain_schedule, sweep)


def _report_crash(settings: Settings, model: str, run_id: str, request_id: str, reason: str,
                  error: str) -> None:  # fmt: skip
    """The pipeline never reported: publish its failure, so the lease is released."""
    from components.runs import RunContext, failure_report  # noqa: PLC0415
    from retrain.bus import PubsubBus  # noqa: PLC0415

    run = RunContext.parse(model, run_id, request_id, reason)
    failure_report(settings, run, "FAILED", error, PubsubBus(settings.project))


def main(
    config: ConfigOption = Path("retrain.yaml"),
    model: Annotated[str, typer.Option("--model", "-m", help="Model name in retrain.yaml.")] = "",
    data: Annotated[
        list[str] | None, typer.Option("--data", help="Data URI (gs:// or a path); repeat.")
    ] = None,
    run_id: Annotated[str, typer.Option(help="Run id; names the run's objects.")] = "",
    request_id: Annotated[str, typer.Option(help="Dedupe key of the request.")] = "",
    reason: Annotated[str, typer.Option(help="data | drift | schedule | manual")] = "manual",
    from_ledger: Annotated[
        bool,
        typer.Option(
            "--from-ledger",
            help="Take the data, request and reason from the ledger's pending events, after "
            "the model's coalescing window (this run must hold the model's lease).",
        ),
    ] = False,
    hold_lease: Annotated[
        bool,
        typer.Option(
            "--hold-lease",
            help="This run holds the model's lease already (`retrain run` took it): record "
            "this worker in the run and keep the lease while it runs.",
        ),
    ] = False,
    workdir: Annotated[Path, typer.Option(help="Folder for outputs and result.json.")] = Path("."),
    image: Annotated[str, typer.Option(help="Component image (recorded, not used locally).")] = (
        "retrain-components:latest"
    ),
) -> None:
    """Worker: run one pipeline with kfp.local and write result.json into --workdir."""
    settings = load_settings(config)
    workdir.mkdir(parents=True, exist_ok=True)
    prepared = ThreadPoolExecutor(1, "prepare").submit(prepare, settings, model, image, workdir)
    data_uris = list(data or [])
    if hold_lease and not from_ledger and not _keep_lease(settings, model, run_id):
        print(f"run {run_id} no longer holds the lease of {model}; nothing to do")  # noqa: T201
        return
    if from_ledger:
        if not _keep_lease(settings, model, run_id):  # taken over before this worker started
            print(f"run {run_id} no longer holds the lease of {model}; nothing to do")  # noqa: T201
            return
        try:
            data_uris, request_id, reason = _from_ledger(settings, model, run_id)
        except Exception as exc:
            _release(settings, model, run_id, exc)
            if isinstance(exc, LookupError):
                return
            raise
    result = None
    try:
        result = run_locally(
            settings,
            config.read_text(encoding="utf-8"),
            model=model,
            data_uris=data_uris,
            run_id=run_id,
            request_id=request_id or run_id,
            reason=reason,
            workdir=workdir,
            image=image,
            prepared=prepared,
        )
    except Exception as exc:
        result = RunResult(
            run_id=run_id,
            model=model,
            state="failed",
            seconds=0.0,
            outputs=str(workdir / "outputs"),
            report_uri=None,
            message_id=None,
            report=None,
            error=f"{type(exc).__name__}: {exc}",
        )
        raise
    finally:
        if result is not None:
            (workdir / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2), "utf-8")
            if result.message_id is None and from_ledger:
                _report_crash(
                    settings, model, run_id, request_id or run_id, reason, result.error or "?"
                )
    sys.exit(0 if result.state == "succeeded" else 1)


if __name__ == "__main__":
    typer.run(main)
