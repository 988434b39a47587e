"""The local stand-in for Cloud Scheduler: publish to ``retrain-schedule`` on each model's cron.

Run by ``retrain up``; alone: ``python -m retrain.scheduler --config retrain.yaml``. The
Pub/Sub client finds the emulator through ``PUBSUB_EMULATOR_HOST``, as in the cloud it
would find the real service.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from croniter import croniter

from retrain import jsonlog
from retrain.config import Settings, load_settings
from retrain.messages import ALL_MODELS
from retrain.options import ConfigOption

__all__ = ["CronJob", "MonitorJob", "SweepJob", "jobs", "monitor_job", "schedule_message"]

log = logging.getLogger("retrain.scheduler")


class CronJob:
    """One model's schedule, and the next time it fires."""

    def __init__(self, model: str, cron: str, timezone: str, now: datetime) -> None:
        self.model = model
        self.cron = cron
        self._iter = croniter(cron, now.astimezone(ZoneInfo(timezone)))
        self.next: datetime = self._iter.get_next(datetime)

    def advance(self) -> datetime:
        fired = self.next
        self.next = self._iter.get_next(datetime)
        return fired


class SweepJob:
    """Every ``sweep_seconds``, a sweep (ScheduleMessage reason "sweep", model "*"): it looks
    at each lease holder and at the events left waiting (infra/terraform/scheduler.tf makes
    the same job in Cloud Scheduler, in whole minutes)."""

    reason = "sweep"

    def __init__(self, seconds: float, now: datetime) -> None:
        self.model = ALL_MODELS
        self.seconds = seconds
        self.next = now + timedelta(seconds=seconds)

    def advance(self) -> datetime:
        fired = self.next
        self.next = fired + timedelta(seconds=self.seconds)
        return fired


class MonitorJob(SweepJob):
    """Every ``monitor_seconds``, a pass of the monitor (ScheduleMessage reason "monitor",
    model "*"): serving drift, live metrics and canaries (retrain/monitoring.py;
    infra/terraform/scheduler.tf makes the same job in Cloud Scheduler, in whole minutes)."""

    reason = "monitor"


Job = CronJob | SweepJob


def jobs(settings: Settings, now: datetime) -> list[Job]:
    """Each model's cron, then the sweep (the monitor's job is :func:`monitor_job`)."""
    crons: list[Job] = [
        CronJob(name, model.schedule.cron, model.schedule.timezone, now)
        for name, model in settings.models.items()
        if model.schedule is not None
    ]
    return [*crons, SweepJob(settings.sweep_seconds, now)]


def monitor_job(settings: Settings, now: datetime) -> MonitorJob:
    """The monitor's pass over every model, every ``monitor_seconds``."""
    return MonitorJob(settings.monitor_seconds, now)


def schedule_message(model: str, fired: datetime, reason: str = "sweep") -> bytes:
    """The payload Cloud Scheduler is configured to send (see infra/terraform): for model
    "*", a sweep or (``reason`` "monitor") a monitor pass."""
    if model == ALL_MODELS:
        return json.dumps({"model": model, "reason": reason}).encode()
    return json.dumps({"model": model, "scheduled_time": fired.isoformat()}).encode()


def _payload(job: Job, fired: datetime) -> bytes:
    if isinstance(job, SweepJob):  # a sweep or a monitor pass, over every model
        return schedule_message(job.model, fired, job.reason)
    return schedule_message(job.model, fired)


def _job_name(job: Job) -> str:
    return job.model if isinstance(job, CronJob) else f"{job.model} ({job.reason})"


def _health_server(host: str, port: int, crons: list[Job]) -> ThreadingHTTPServer:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self.send_error(404, "only /healthz is served here")
                return
            body = json.dumps(
                {"status": "ok", "next": {_job_name(j): j.next.isoformat() for j in crons}}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # health probes are not worth a log line each

    return ThreadingHTTPServer((host, port), Health)


def run(settings: Settings, host: str, port: int) -> None:
    from google.cloud import pubsub_v1  # noqa: PLC0415 (keeps --help fast)

    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(settings.project, settings.topics.retrain_schedule)
    now = datetime.now(UTC)
    crons = [*jobs(settings, now), monitor_job(settings, now)]
    server = _health_server(host, port, crons)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log.info("%d schedule(s), health on http://%s:%d/healthz", len(crons), host, port)
    while not stopping.is_set():
        now = datetime.now(UTC)
        for job in crons:
            while job.next <= now:
                fired = job.advance()
                future = publisher.publish(topic, _payload(job, fired), model=job.model)
                log.info(
                    "%s at %s: published %s", _job_name(job), fired.isoformat(), future.result(30)
                )
        wait = min((j.next - now).total_seconds() for j in crons)  # (a sweep job always)
        stopping.wait(timeout=max(0.05, min(wait, 60.0)))
    server.shutdown()


def main(
    config: ConfigOption = Path("retrain.yaml"),
    host: Annotated[
        str, typer.Option(envvar="SCHEDULER_HOST", help="Health server address.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SCHEDULER_PORT", help="Health server port.")] = 8095,
) -> None:
    """Publish a schedule message for each model on its cron from retrain.yaml."""
    jsonlog.configure()
    run(load_settings(config), host, port)


if __name__ == "__main__":
    typer.run(main)
