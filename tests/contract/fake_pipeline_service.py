"""Small local fakes of the Google Cloud APIs that a pipeline launch touches.

- :class:`FakeVertex`: the Vertex AI ``PipelineService`` (create and get pipeline jobs)
  and ``ScheduleService`` (create, list, get, patch and delete schedules), over REST.
- :class:`FakeStorage`: the few Cloud Storage JSON API routes that a launch reads: a
  bucket's metadata (``PipelineJob.submit`` checks the pipeline root's bucket), an object
  listing (the model's data window) and an object's bytes (a ``gs://`` template).
- :class:`TakenOverLedger`: the real Firestore ledger, on which a run loses its lease
  right after it gathered its events.
- :func:`write_config` and the golden template: the inputs that the contract tests share.

Each server binds 127.0.0.1 on a free port, serves from a thread, records every request
(method, path, query, JSON body), and answers 404, 400 or 409 to anything it does not
know, as the real API would: a fake that accepted anything would test nothing. A test may
set ``on_request`` to look at the world (e.g. the ledger) when a request arrives.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from retrain.config import Settings, load_settings
from retrain.ledger import FirestoreLedger
from retrain.statedb import Change

__all__ = [
    "GOLDEN_TEMPLATE",
    "NETWORK",
    "PIPELINE_ACCOUNT",
    "FakeStorage",
    "FakeVertex",
    "Recorded",
    "RecordingServer",
    "Reply",
    "TakenOverLedger",
    "tasks",
    "without_caching",
    "write_config",
]

# (status, body): a JSON value, or bytes sent as they are.
Reply = tuple[int, Any]


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # the parsed JSON body, or None

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


class RecordingServer:
    """An HTTP server in a thread that records each request and answers with
    :meth:`route`, which subclasses implement; use it as a context manager."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        # Called with each request before it is answered (outside the lock, so that it
        # may call ``received``); e.g. to read the ledger at the moment of a create.
        self.on_request: Callable[[Recorded], None] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------

    def __enter__(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return None  # quiet: the fake records requests instead

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},  # shutdown() waits up to one interval
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        assert self._server is not None
        assert self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- requests --------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            status, reply = 400, self.error(400, "the body is not JSON")
        else:
            request = Recorded(handler.command, parts.path, parse_qs(parts.query), body)
            if self.on_request is not None:
                self.on_request(request)
            with self.lock:
                self.requests.append(request)
                try:
                    status, reply = self.route(request)
                except Exception as exc:  # noqa: BLE001 (the test sees a 500, not a hang)
                    status, reply = 500, self.error(500, f"{type(exc).__name__}: {exc}")
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        kind = "application/octet-stream" if isinstance(reply, bytes) else "application/json"
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def route(self, request: Recorded) -> Reply:
        raise NotImplementedError

    def error(self, code: int, message: str) -> Any:
        """The error body of this API (Google's JSON error format by default)."""
        status = {
            400: "INVALID_ARGUMENT",
            404: "NOT_FOUND",
            409: "ALREADY_EXISTS",
            500: "INTERNAL",
        }[code]
        return {"error": {"code": code, "message": message, "status": status}}

    def unknown(self, request: Recorded) -> Reply:
        return 404, self.error(404, f"the fake does not serve {request.method} {request.path}")

    def received(self, method: str, pattern: str = "") -> list[Recorded]:
        """The requests of ``method`` whose path matches the regex ``pattern``."""
        with self.lock:
            return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def writes(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method != "GET"]


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- Vertex AI -------------------------------------------------------------------------------

_JOB_ID = re.compile(r"^[a-z][-a-z0-9]{0,127}$")
_SCHEDULE_FIELDS = {  # updateMask path -> field, for the fields that sync may update
    "cron": "cron",
    "maxConcurrentRunCount": "maxConcurrentRunCount",
    "max_concurrent_run_count": "maxConcurrentRunCount",
}


class FakeVertex(RecordingServer):
    """Vertex AI ``PipelineService`` and ``ScheduleService`` (v1, REST) for one project and
    location; ``jobs`` and ``schedules`` hold the stored resources by id."""

    def __init__(self, project: str, location: str) -> None:
        super().__init__()
        self.parent = f"projects/{project}/locations/{location}"
        self.jobs: dict[str, dict[str, Any]] = {}
        self.schedules: dict[str, dict[str, Any]] = {}
        self._next = 1

    def seed_job(
        self, job_id: str, state: str, *, labels: dict[str, str] | None = None,
        schedule: str | None = None,
    ) -> str:  # fmt: skip
        """Store a pipeline job in ``state`` as if someone (or a ``schedule``) had created
        it; return its name."""
        with self.lock:
            self.jobs[job_id] = {
                "name": f"{self.parent}/pipelineJobs/{job_id}",
                "displayName": job_id,
                "state": state,
                "createTime": _timestamp(datetime.now(UTC)),
                **({"labels": labels} if labels else {}),
                **({"scheduleName": f"{self.parent}/schedules/{schedule}"} if schedule else {}),
            }
            return str(self.jobs[job_id]["name"])

    def seed_schedule(self, schedule: dict[str, Any]) -> str:
        """Store ``schedule`` as if someone had created it; return its resource name."""
        with self.lock:
            return self._store_schedule(json.loads(json.dumps(schedule)))

    def route(self, request: Recorded) -> Reply:  # noqa: PLR0911 (a return per route)
        prefix = f"/v1/{self.parent}/"
        if not request.path.startswith(prefix):
            return self.unknown(request)
        rest = request.path.removeprefix(prefix)
        method = request.method
        if rest == "pipelineJobs" and method == "POST":
            return self._create_job(request)
        if (found := re.fullmatch(r"pipelineJobs/([^/:]+)", rest)) and method == "GET":
            job = self.jobs.get(found[1])
            return (200, job) if job else (404, self.error(404, f"no pipeline job {found[1]}"))
        if rest == "schedules" and method == "POST":
            return self._create_schedule(request)
        if rest == "schedules" and method == "GET":
            if request.param("filter") or request.param("pageToken"):
                return 400, self.error(400, "the fake lists schedules unfiltered, in one page")
            schedules = list(self.schedules.values())
            return 200, ({"schedules": schedules} if schedules else {})
        if found := re.fullmatch(r"schedules/([^/:]+)", rest):
            return self._schedule(request, found[1])
        return self.unknown(request)

    def _create_job(self, request: Recorded) -> Reply:
        job_id = request.param("pipelineJobId")
        body = request.body
        if not job_id or not _JOB_ID.match(job_id):
            return 400, self.error(400, f"pipelineJobId {job_id!r} is not [a-z][-a-z0-9]{{0,127}}")
        if not isinstance(body, dict) or not body.get("pipelineSpec"):
            return 400, self.error(400, "a pipeline job needs a pipelineSpec")
        if not body.get("runtimeConfig", {}).get("gcsOutputDirectory"):
            return 400, self.error(400, "runtimeConfig.gcsOutputDirectory (pipeline root) is unset")
        if job_id in self.jobs:
            return 409, self.error(409, f"PipelineJob {self.parent}/pipelineJobs/{job_id} exists")
        job = {
            **json.loads(json.dumps(body)),
            "name": f"{self.parent}/pipelineJobs/{job_id}",
            "state": "PIPELINE_STATE_PENDING",
            "createTime": _timestamp(datetime.now(UTC)),
        }
        self.jobs[job_id] = job
        return 200, job

    def _create_schedule(self, request: Recorded) -> Reply:
        body = request.body
        if not isinstance(body, dict):
            return 400, self.error(400, "a schedule needs a body")
        for key in ("displayName", "cron", "createPipelineJobRequest"):
            if not body.get(key):
                return 400, self.error(400, f"a schedule needs {key}")
        request_job = body["createPipelineJobRequest"]
        if request_job.get("parent") != self.parent or not request_job.get("pipelineJob"):
            return 400, self.error(400, "createPipelineJobRequest needs parent and pipelineJob")
        name = self._store_schedule(json.loads(json.dumps(body)))  # not the recorded one
        return 200, self.schedules[name.rpartition("/")[2]]

    def _store_schedule(self, schedule: dict[str, Any]) -> str:
        schedule_id = str(self._next)
        self._next += 1
        now = datetime.now(UTC)
        schedule.update(
            name=f"{self.parent}/schedules/{schedule_id}",
            state=schedule.get("state", "ACTIVE"),
            createTime=_timestamp(now),
            nextRunTime=_timestamp(now + timedelta(hours=1)),
        )
        self.schedules[schedule_id] = schedule
        return str(schedule["name"])

    def _schedule(self, request: Recorded, schedule_id: str) -> Reply:
        schedule = self.schedules.get(schedule_id)
        if schedule is None:
            return 404, self.error(404, f"no schedule {schedule_id}")
        if request.method == "GET":
            return 200, schedule
        if request.method == "DELETE":
            del self.schedules[schedule_id]
            return 200, {
                "name": f"{schedule['name']}/operations/{schedule_id}",
                "done": True,
                "response": {"@type": "type.googleapis.com/google.protobuf.Empty"},
            }
        if request.method == "PATCH":
            paths = (request.param("updateMask") or "").split(",")
            unknown = [p for p in paths if p not in _SCHEDULE_FIELDS]
            if unknown or not isinstance(request.body, dict):
                return 400, self.error(400, f"the fake cannot update {unknown or 'that'}")
            for path in paths:
                key = _SCHEDULE_FIELDS[path]
                schedule[key] = request.body[key]
            schedule["updateTime"] = _timestamp(datetime.now(UTC))
            return 200, schedule
        return self.unknown(request)


# -- Cloud Storage (read-only) ---------------------------------------------------------------


class FakeStorage(RecordingServer):
    """Read-only Cloud Storage JSON API; point the clients at it with
    ``STORAGE_EMULATOR_HOST``. ``buckets`` maps bucket -> object name -> bytes; objects are
    ``updated`` in the order they were given."""

    def __init__(self, buckets: dict[str, dict[str, bytes]]) -> None:
        super().__init__()
        self.buckets = buckets
        self._epoch = datetime(2026, 1, 1, tzinfo=UTC)

    def _object(self, bucket: str, name: str, index: int) -> dict[str, Any]:
        return {
            "kind": "storage#object",
            "bucket": bucket,
            "name": name,
            "size": str(len(self.buckets[bucket][name])),
            "generation": "1",
            "updated": _timestamp(self._epoch + timedelta(minutes=index)),
        }

    def route(self, request: Recorded) -> Reply:  # noqa: PLR0911 (a return per route)
        if request.method != "GET":
            return 405, {"error": {"code": 405, "message": "the fake storage is read-only"}}
        path = request.path
        if found := re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", path):
            bucket, name = found[1], unquote(found[2])
            objects = self.buckets.get(bucket, {})
            if name not in objects:
                return 404, self.error(404, f"no object gs://{bucket}/{name}")
            if request.param("alt") == "media":
                return 200, objects[name]
            return 200, self._object(bucket, name, list(objects).index(name))
        if found := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path):
            bucket = found[1]
            if bucket not in self.buckets:
                return 404, self.error(404, f"no bucket {bucket}")
            prefix = request.param("prefix") or ""
            items = [
                self._object(bucket, name, index)
                for index, name in enumerate(self.buckets[bucket])
                if name.startswith(prefix)
            ]
            return 200, {"kind": "storage#objects", **({"items": items} if items else {})}
        if found := re.fullmatch(r"/storage/v1/b/([^/]+)", path):
            if found[1] not in self.buckets:
                return 404, self.error(404, f"no bucket {found[1]}")
            return 200, {"kind": "storage#bucket", "name": found[1], "id": found[1]}
        return self.unknown(request)


# -- the ledger --------------------------------------------------------------------------------


class TakenOverLedger(FirestoreLedger):
    """The real ledger, on which each run loses the model's lease to ``rival`` right after
    it gathered its events (``start``).

    By default the sweep takes the lease over (the run was slow, its gathering lease
    expired, and it had no pipeline yet): the run ends, its events wait again, and
    ``renew`` answers ``released``. With ``ended=False`` the lease just moves to ``rival``
    in one guarded commit, the run's record untouched: ``renew`` answers ``lost``, and
    only the run itself can give its events back."""

    def __init__(self, ledger: FirestoreLedger, rival: str, *, ended: bool = True) -> None:
        super().__init__(ledger.db, ledger.clock)
        self.rival = rival
        self.ended = ended

    def start(self, model: str, run_id: str, data_uris: list[str]) -> None:
        super().start(model, run_id, data_uris)
        if self.ended:
            why = "its pipeline never started (its gathering lease expired)"
            assert self.take_over(model, run_id, self.rival, 300, why)
            return
        lease = self.db.read(self._model_doc(model))
        change = Change()
        change.put(lease, {"lease": self._new_lease(self.rival, 300)})
        self.db.commit(change)


# -- inputs of the contract tests ----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_TEMPLATE = ROOT / "pipelines" / "retrain_pipeline.yaml"
PIPELINE_ACCOUNT = "retrain-runner@retrain-test.iam.gserviceaccount.com"
NETWORK = "projects/123456789/global/networks/retrain-vpc"


def write_config(
    directory: Path,
    backend: str,
    models: dict[str, dict[str, Any] | None] | None = None,
    **gcp: Any,
) -> tuple[Settings, str]:
    """The shipped retrain.yaml for ``backend``, without coalescing wait, with a gcp section
    (service account, network, a label, caching off, plus ``gcp``) and ``models`` merged
    over the shipped ones (None removes a model). Returns the settings and the file's text.
    """
    raw = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    raw.update(project="retrain-test", backend=backend)
    raw["gcp"] = {
        "pipeline_service_account": PIPELINE_ACCOUNT,
        "network": NETWORK,
        "labels": {"team": "forecasting"},
        "enable_caching": False,
        **gcp,
    }
    shipped = raw["models"]["rainfall"]
    for name, changes in (models or {}).items():
        if changes is None:
            raw["models"].pop(name, None)
        else:
            raw["models"][name] = {**raw["models"].get(name, shipped), **changes}
    for model in raw["models"].values():
        model["coalesce_seconds"] = 0
    path = directory / "retrain.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_settings(path), path.read_text(encoding="utf-8")


def tasks(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every task of a pipeline spec: the root DAG's and each component DAG's."""
    for component in [spec["root"], *spec["components"].values()]:
        yield from component.get("dag", {}).get("tasks", {}).values()


def without_caching(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without the tasks' caching options (the submit call overrides them)."""
    copy: dict[str, Any] = json.loads(json.dumps(spec))
    for task in tasks(copy):
        task.pop("cachingOptions", None)
    return copy
