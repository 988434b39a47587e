"""A small fake of Vertex AI's ModelService, EndpointService and operations, over REST.

The real ``google-cloud-aiplatform`` SDK talks to it after::

    aiplatform.init(api_endpoint=fake.url, api_transport="rest",
                    credentials=AnonymousCredentials(), project=..., location=...)

It implements only the routes that :mod:`retrain.gatekeeper.vertex` and
:mod:`serving.vertex_endpoint` need, with the documented semantics that matter to them,
and answers anything else with 404 (and remembers it in :attr:`FakeModelService.unrouted`,
so a test can fail on a call nobody expected):

- ``models:upload`` (a new model with ``modelId``, or a new version with ``parentModel``;
  409 if ``modelId`` exists), ``models/{id}[@version|@alias]`` GET, ``:listVersions`` with
  a ``labels.key="value"`` filter, ``:mergeVersionAliases`` (an alias is unique within a
  model: adding it to one version takes it from the other; ``default`` cannot be removed),
  ``:deleteVersion``;
- ``endpoints`` create / list (label filter) / GET / PATCH (``updateMask=traffic_split``),
  ``:deployModel`` and ``:undeployModel``, with the traffic split checked (sums to 100,
  names only deployed models, a model is undeployed only without traffic);
- operations: every long-running call answers a pending operation whose effect happens
  when the client first polls it (``GET /ui/{name}`` or ``/v1/{name}``), so a test can
  tell "waited for the operation" from "did not". A test can make the operations of one
  call (``deployModel`` or ``undeployModel``) stay not done for N polls or until it
  releases them (:meth:`FakeModelService.hold`, :meth:`~FakeModelService.release`), or
  end in an error with no effect (:meth:`~FakeModelService.fail`); every operation counts
  its polls (:attr:`FakeModelService.operations`).

Every request is recorded in :attr:`FakeModelService.calls` (method, path, query, JSON body).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["ApiError", "Call", "FakeModelService", "Operation"]

_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_ALIAS = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")
_MODEL_ID = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
_FILTER_TERM = re.compile(r'^labels\.([a-z][a-z0-9_-]*)\s*=\s*"?([a-z0-9_-]*)"?$')
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
_TYPES = "type.googleapis.com/google.cloud.aiplatform.v1."


class ApiError(Exception):
    """An error answer in Google's JSON error shape."""

    STATUS: ClassVar[dict[int, str]] = {
        400: "INVALID_ARGUMENT",
        404: "NOT_FOUND",
        409: "ALREADY_EXISTS",
        412: "FAILED_PRECONDITION",
    }

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        status = self.STATUS.get(self.code, "UNKNOWN")
        return {"error": {"code": self.code, "message": self.message, "status": status}}


@dataclass(frozen=True)
class Call:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any]

    @property
    def verb(self) -> str:
        """The custom verb (``upload``, ``deployModel``, ...) or the last path segment."""
        return self.path.rsplit(":", 1)[1] if ":" in self.path.rsplit("/", 1)[-1] else ""

    @property
    def mutates(self) -> bool:
        return self.method != "GET"


@dataclass
class Operation:
    """One long-running operation as the fake keeps it."""

    name: str
    effect: Callable[[], dict[str, Any]]
    verb: str = ""  # the call that started it, where it can be held or failed
    remaining: int | None = 0  # polls still answered "not done"; None: until released
    error: dict[str, Any] | None = None  # ends with this error (and no effect)
    polls: int = 0
    done: bool = False
    result: dict[str, Any] = field(default_factory=dict)


class FakeModelService:
    """The fake service and its state; use as a context manager (binds 127.0.0.1:0)."""

    def __init__(self, project: str = "retrain-test", location: str = "us-central1") -> None:
        self.project = project
        self.location = location
        self.parent = f"projects/{project}/locations/{location}"
        self.calls: list[Call] = []
        self.unrouted: list[Call] = []
        # model id -> version id -> Model JSON (one version each)
        self.models: dict[str, dict[str, dict[str, Any]]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, Operation] = {}
        self._holds: dict[str, int | None] = {}  # verb -> polls that its operations wait
        self._failures: dict[str, str] = {}  # verb -> the error its operations end with
        self._barrier: threading.Barrier | None = None
        self._held = 0
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeModelService:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._handle(self)

            def do_POST(self) -> None:
                fake._handle(self)

            def do_PATCH(self) -> None:
                fake._handle(self)

            def do_DELETE(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: the calls are recorded instead

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- what tests look at ------------------------------------------------------------

    def mutations(self, since: int = 0) -> list[Call]:
        """The calls that change something (not GET), from index ``since``."""
        with self._lock:
            return [c for c in self.calls[since:] if c.mutates]

    def version(self, model_id: str, version_id: str) -> dict[str, Any]:
        with self._lock:
            return self.models[model_id][version_id]

    def alias_holder(self, model_id: str, alias: str) -> str | None:
        with self._lock:
            for vid, value in self.models.get(model_id, {}).items():
                if alias in value["versionAliases"]:
                    return vid
        return None

    def endpoint_state(self, display_name: str) -> dict[str, Any]:
        """The one endpoint with this display name (its deployed models and traffic)."""
        with self._lock:
            found = [e for e in self.endpoints.values() if e["displayName"] == display_name]
            assert len(found) == 1, f"{len(found)} endpoints named {display_name}"
            copy: dict[str, Any] = json.loads(json.dumps(found[0]))
            return copy

    def hold(self, verb: str = "deployModel", polls: int | None = None) -> None:
        """Operations of ``verb`` started from now on answer "not done" to their first
        ``polls`` polls, or (None) to every poll until :meth:`release`."""
        with self._lock:
            self._holds[verb] = polls

    def release(self, verb: str = "deployModel") -> None:
        """Held operations of ``verb`` finish at their next poll; later ones at once."""
        with self._lock:
            self._holds.pop(verb, None)
            for operation in self.operations.values():
                if operation.verb == verb and not operation.done:
                    operation.remaining = 0

    def fail(self, verb: str = "deployModel", message: str | None = None) -> None:
        """Operations of ``verb`` started from now on end in an error (code 9,
        FAILED_PRECONDITION) with ``message``, changing nothing; None: they succeed again."""
        with self._lock:
            if message is None:
                self._failures.pop(verb, None)
            else:
                self._failures[verb] = message

    def operations_of(self, verb: str) -> list[Operation]:
        """The operations that ``verb`` calls started, oldest first."""
        with self._lock:
            return [o for o in self.operations.values() if o.verb == verb]

    @contextmanager
    def uploads_meet(self, parties: int, timeout: float = 5.0) -> Iterator[None]:
        """Hold the next ``parties`` uploads until all of them arrived, so that they race
        for certain; later uploads (a retry) pass at once."""
        with self._lock:
            self._barrier, self._held = threading.Barrier(parties, timeout=timeout), parties
        try:
            yield
        finally:
            with self._lock:
                self._barrier, self._held = None, 0

    # -- HTTP --------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        split = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"<not json>": raw.decode(errors="replace")}
        call = Call(request.command, unquote(split.path), query, body)
        with self._lock:
            self.calls.append(call)
        try:
            if call.verb == "upload":
                self._meet()
            status, answer = 200, self._route(call)
        except ApiError as exc:
            status, answer = exc.code, exc.body()
        data = json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _meet(self) -> None:
        with self._lock:
            barrier = self._barrier if self._held > 0 else None
            self._held -= 1
        if barrier is not None:
            barrier.wait()

    def _route(self, call: Call) -> dict[str, Any]:
        p = re.escape(self.parent)
        routes: list[tuple[str, str, Callable[..., dict[str, Any]]]] = [
            ("GET", rf"/(?:v1|ui)/({p}/(?:(?:models|endpoints)/[^/:]+/)?operations/[^/:]+)",
             self._get_operation),
            ("POST", rf"/v1/{p}/models:upload", self._upload),
            ("GET", rf"/v1/{p}/models/([^/:]+)", self._get_model),
            ("GET", rf"/v1/{p}/models/([^/:@]+):listVersions", self._list_versions),
            ("POST", rf"/v1/{p}/models/([^/:]+):mergeVersionAliases", self._merge_aliases),
            ("DELETE", rf"/v1/{p}/models/([^/:]+):deleteVersion", self._delete_version),
            ("POST", rf"/v1/{p}/endpoints", self._create_endpoint),
            ("GET", rf"/v1/{p}/endpoints", self._list_endpoints),
            ("GET", rf"/v1/{p}/endpoints/([^/:]+)", self._get_endpoint),
            ("PATCH", rf"/v1/{p}/endpoints/([^/:]+)", self._patch_endpoint),
            ("POST", rf"/v1/{p}/endpoints/([^/:]+):deployModel", self._deploy_model),
            ("POST", rf"/v1/{p}/endpoints/([^/:]+):undeployModel", self._undeploy_model),
        ]  # fmt: skip
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, call.path)
            if method == call.method and match:
                with self._lock:
                    return handler(call, *match.groups())
        with self._lock:
            self.unrouted.append(call)
        raise ApiError(404, f"the fake has no route {call.method} {call.path}")

    # -- helpers -----------------------------------------------------------------------

    def _now(self) -> str:
        """Strictly increasing timestamps (RFC 3339), so 'newest' is well defined."""
        moment = _EPOCH + timedelta(microseconds=next(self._clock))
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _operation(
        self, under: str, effect: Callable[[], dict[str, Any]], verb: str = ""
    ) -> dict[str, Any]:
        name = f"{under}/operations/{next(self._ids)}"
        failure = self._failures.get(verb)
        self.operations[name] = Operation(
            name,
            effect,
            verb=verb,
            remaining=self._holds.get(verb, 0),
            error=None if failure is None else {"code": 9, "message": failure},
        )
        return {"name": name, "done": False}

    def _get_operation(self, call: Call, name: str) -> dict[str, Any]:
        operation = self.operations.get(name)
        if operation is None:
            raise ApiError(404, f"operation {name} not found")
        operation.polls += 1
        if not operation.done:
            if operation.remaining is None or operation.remaining > 0:
                if operation.remaining is not None:
                    operation.remaining -= 1
                return {"name": name, "done": False}
            if operation.error is None:
                operation.result = operation.effect()
            operation.done = True
        if operation.error is not None:
            return {"name": name, "done": True, "error": operation.error}
        return {"name": name, "done": True, "response": operation.result}

    @staticmethod
    def _check_labels(labels: Any, what: str) -> dict[str, str]:
        if labels is None:
            return {}
        if not isinstance(labels, dict) or len(labels) > 64:
            raise ApiError(400, f"{what}: labels must be a map of at most 64 entries")
        for key, value in labels.items():
            if (
                not _LABEL_KEY.match(key)
                or not isinstance(value, str)
                or not (_LABEL_VALUE.match(value))
            ):
                raise ApiError(400, f"{what}: invalid label {key}={value!r}")
        return dict(labels)

    @staticmethod
    def _label_filter(text: str | None) -> dict[str, str]:
        """``labels.a="x" AND labels.b="y"`` -> {a: x, b: y}; anything else is a 400."""
        if not text:
            return {}
        wanted = {}
        for term in re.split(r"\s+AND\s+", text.strip()):
            match = _FILTER_TERM.match(term.strip())
            if not match:
                raise ApiError(400, f"the fake understands only label equality, not {term!r}")
            wanted[match.group(1)] = match.group(2)
        return wanted

    def _model_id(self, resource: str) -> tuple[str, str | None]:
        """``projects/p/locations/l/models/m@v`` or ``m@v`` -> (m, v)."""
        name = resource.removeprefix(f"{self.parent}/models/")
        if "/" in name:
            raise ApiError(400, f"{resource!r} is not a model of {self.parent}")
        model_id, _, version = name.partition("@")
        return model_id, version or None

    def _resolve(self, model_id: str, version: str | None) -> dict[str, Any]:
        versions = self.models.get(model_id)
        if not versions:
            raise ApiError(404, f"model {model_id} not found")
        wanted = version or "default"
        if wanted in versions:
            return versions[wanted]
        for value in versions.values():
            if wanted in value["versionAliases"]:
                return value
        raise ApiError(404, f"model {model_id} has no version or alias {wanted!r}")

    def _move_alias(self, model_id: str, version_id: str, alias: str) -> None:
        for vid, value in self.models[model_id].items():
            if vid != version_id and alias in value["versionAliases"]:
                value["versionAliases"].remove(alias)
        aliases = self.models[model_id][version_id]["versionAliases"]
        if alias not in aliases:
            aliases.append(alias)

    # -- ModelService -------------------------------------------------------------------

    def _upload(self, call: Call) -> dict[str, Any]:
        model = call.body.get("model") or {}
        if not model.get("displayName"):
            raise ApiError(400, "model.displayName is required")
        if model.get("artifactUri") and not str(model["artifactUri"]).startswith("gs://"):
            raise ApiError(400, f"artifactUri {model['artifactUri']!r} is not a gs:// URI")
        if model.get("artifactUri") and not (model.get("containerSpec") or {}).get("imageUri"):
            raise ApiError(400, "containerSpec.imageUri is required with an artifactUri")
        labels = self._check_labels(model.get("labels"), "model")
        aliases = list(model.get("versionAliases") or [])
        for alias in aliases:
            if not _ALIAS.match(alias) or alias.isdigit():
                raise ApiError(400, f"invalid version alias {alias!r}")
        parent = call.body.get("parentModel")
        model_id = call.body.get("modelId")
        if parent:
            model_id, _ = self._model_id(parent)
            if model_id not in self.models:
                raise ApiError(404, f"parent model {parent} not found")
            version_id = str(max(int(v) for v in self.models[model_id]) + 1)
        else:
            if model_id is None:
                model_id = str(next(self._ids) * 1000)
            if not _MODEL_ID.match(model_id):
                raise ApiError(400, f"invalid model id {model_id!r}")
            if model_id in self.models:
                raise ApiError(409, f"model {model_id} already exists")
            self.models[model_id] = {}
            version_id = "1"
            aliases = ["default", *(a for a in aliases if a != "default")]
        now = self._now()
        self.models[model_id][version_id] = {
            "name": f"{self.parent}/models/{model_id}",
            "versionId": version_id,
            "versionAliases": [],
            "displayName": model["displayName"],
            "versionDescription": model.get("versionDescription", ""),
            "artifactUri": model.get("artifactUri", ""),
            "containerSpec": model.get("containerSpec", {}),
            "labels": labels,
            "createTime": now,
            "updateTime": now,
            "versionCreateTime": now,
            "versionUpdateTime": now,
            "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"],
        }
        for alias in aliases:
            self._move_alias(model_id, version_id, alias)
        name = f"{self.parent}/models/{model_id}"
        return self._operation(
            name,
            lambda: {"@type": _TYPES + "UploadModelResponse", "model": name,
                     "modelVersionId": version_id},
        )  # fmt: skip

    def _get_model(self, call: Call, name: str) -> dict[str, Any]:
        model_id, version = self._model_id(name)
        return self._resolve(model_id, version)

    def _list_versions(self, call: Call, model_id: str) -> dict[str, Any]:
        wanted = self._label_filter(call.query.get("filter"))
        if model_id not in self.models:
            raise ApiError(404, f"model {model_id} not found")
        found = [
            value
            for value in self.models[model_id].values()
            if all(value["labels"].get(k) == v for k, v in wanted.items())
        ]
        return {"models": found}

    def _merge_aliases(self, call: Call, name: str) -> dict[str, Any]:
        model_id, version = self._model_id(name)
        if version is None or not version.isdigit():
            raise ApiError(400, "mergeVersionAliases needs a version id in the name (m@123)")
        target = self._resolve(model_id, version)
        changes = call.body.get("versionAliases") or []
        if not changes:
            raise ApiError(400, "versionAliases is required")
        for change in changes:
            alias = change.removeprefix("-")
            if not _ALIAS.match(alias) or alias.isdigit():
                raise ApiError(400, f"invalid version alias {alias!r}")
            if change.startswith("-") and alias == "default":
                raise ApiError(400, "the default alias cannot be removed; move it instead")
        for change in changes:
            if change.startswith("-"):
                if change[1:] in target["versionAliases"]:
                    target["versionAliases"].remove(change[1:])
            else:
                self._move_alias(model_id, version, change)
        target["versionUpdateTime"] = self._now()
        return target

    def _delete_version(self, call: Call, name: str) -> dict[str, Any]:
        model_id, version = self._model_id(name)
        if version is None:
            raise ApiError(400, "deleteVersion needs a version in the name")
        value = self._resolve(model_id, version)
        if "default" in value["versionAliases"]:
            raise ApiError(400, "cannot delete the default version")
        for endpoint in self.endpoints.values():
            for deployed in endpoint.get("deployedModels", []):
                if deployed["model"].endswith(f"/{model_id}") and (
                    deployed["modelVersionId"] == value["versionId"]
                ):
                    raise ApiError(400, "cannot delete a deployed version")
        del self.models[model_id][value["versionId"]]
        return self._operation(
            self.parent, lambda: {"@type": "type.googleapis.com/google.protobuf.Empty"}
        )

    # -- EndpointService ---------------------------------------------------------------

    def _create_endpoint(self, call: Call) -> dict[str, Any]:
        if not call.body.get("displayName"):
            raise ApiError(400, "endpoint.displayName is required")
        labels = self._check_labels(call.body.get("labels"), "endpoint")
        logging_config = self._check_logging(call.body.get("predictRequestResponseLoggingConfig"))
        endpoint_id = call.query.get("endpointId") or str(next(self._ids) * 1000 + 7)
        name = f"{self.parent}/endpoints/{endpoint_id}"
        if name in self.endpoints:
            raise ApiError(409, f"endpoint {endpoint_id} already exists")
        now = self._now()
        self.endpoints[name] = {
            "name": name,
            "displayName": call.body["displayName"],
            "labels": labels,
            "deployedModels": [],
            "trafficSplit": {},
            "createTime": now,
            "updateTime": now,
            **({"predictRequestResponseLoggingConfig": logging_config} if logging_config else {}),
        }
        return self._operation(name, lambda: {"@type": _TYPES + "Endpoint", **self.endpoints[name]})

    @staticmethod
    def _check_logging(config: Any) -> dict[str, Any] | None:
        """``predictRequestResponseLoggingConfig`` as Vertex AI checks it: a sampling rate
        in [0, 1] and, if given, a BigQuery table ``bq://project.dataset.table``."""
        if config is None:
            return None
        if not isinstance(config, dict) or set(config) - {
            "enabled", "samplingRate", "bigqueryDestination"
        }:  # fmt: skip
            raise ApiError(400, f"predictRequestResponseLoggingConfig: unknown fields {config}")
        rate = config.get("samplingRate", 0)
        if not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ApiError(400, f"samplingRate {rate!r} must be in [0, 1]")
        uri = (config.get("bigqueryDestination") or {}).get("outputUri", "")
        if uri and not re.fullmatch(r"bq://[\w-]+(\.[\w-]+){1,2}", uri):
            raise ApiError(400, f"bigqueryDestination.outputUri {uri!r} is not bq://p.d[.t]")
        return dict(config)

    def _endpoint(self, endpoint_id: str) -> dict[str, Any]:
        name = f"{self.parent}/endpoints/{endpoint_id}"
        if name not in self.endpoints:
            raise ApiError(404, f"endpoint {endpoint_id} not found")
        return self.endpoints[name]

    def _list_endpoints(self, call: Call) -> dict[str, Any]:
        wanted = self._label_filter(call.query.get("filter"))
        found = [
            e for e in self.endpoints.values()
            if all(e["labels"].get(k) == v for k, v in wanted.items())
        ]  # fmt: skip
        return {"endpoints": sorted(found, key=lambda e: str(e["createTime"]))}

    def _get_endpoint(self, call: Call, endpoint_id: str) -> dict[str, Any]:
        return self._endpoint(endpoint_id)

    def _check_split(
        self, split: dict[str, Any], deployed: set[str], what: str, allow_empty: bool = False
    ) -> dict[str, int]:
        shares = {str(k): int(v) for k, v in split.items()}
        if not shares and allow_empty:
            return shares
        if sum(shares.values()) != 100 or any(v < 0 for v in shares.values()):
            raise ApiError(400, f"{what}: traffic split {shares} must add up to 100")
        unknown = set(shares) - deployed
        if unknown:
            raise ApiError(400, f"{what}: traffic split names undeployed models {unknown}")
        return {k: v for k, v in shares.items() if v}

    def _patch_endpoint(self, call: Call, endpoint_id: str) -> dict[str, Any]:
        endpoint = self._endpoint(endpoint_id)
        mask = {m.strip() for m in call.query.get("updateMask", "").split(",") if m.strip()}
        if mask not in ({"trafficSplit"}, {"traffic_split"}):
            raise ApiError(400, f"the fake updates only the traffic split, not {sorted(mask)}")
        ids = {d["id"] for d in endpoint["deployedModels"]}
        endpoint["trafficSplit"] = self._check_split(
            call.body.get("trafficSplit") or {}, ids, "update"
        )
        endpoint["updateTime"] = self._now()
        return endpoint

    def _deploy_model(self, call: Call, endpoint_id: str) -> dict[str, Any]:
        endpoint = self._endpoint(endpoint_id)
        deployed = call.body.get("deployedModel") or {}
        model_id, version = self._model_id(str(deployed.get("model", "")))
        target = self._resolve(model_id, version)
        resources = deployed.get("dedicatedResources") or {}
        if not (resources.get("machineSpec") or {}).get("machineType"):
            raise ApiError(400, "dedicatedResources.machineSpec.machineType is required")
        low, high = resources.get("minReplicaCount", 0), resources.get("maxReplicaCount", 0)
        if low < 1 or high < low:
            raise ApiError(400, f"replica counts min {low}, max {high} are invalid")
        ids = {d["id"] for d in endpoint["deployedModels"]}
        split = self._check_split(call.body.get("trafficSplit") or {}, ids | {"0"}, "deploy")
        name = endpoint["name"]

        def effect() -> dict[str, Any]:
            new_id = str(next(self._ids) * 1000 + 1)
            value = {
                "id": new_id,
                "model": f"{self.parent}/models/{model_id}",
                "modelVersionId": target["versionId"],
                "displayName": deployed.get("displayName") or target["displayName"],
                "dedicatedResources": resources,
                "createTime": self._now(),
            }
            endpoint["deployedModels"].append(value)
            endpoint["trafficSplit"] = {(new_id if k == "0" else k): v for k, v in split.items()}
            endpoint["updateTime"] = self._now()
            return {"@type": _TYPES + "DeployModelResponse", "deployedModel": value}

        return self._operation(name, effect, call.verb)

    def _undeploy_model(self, call: Call, endpoint_id: str) -> dict[str, Any]:
        endpoint = self._endpoint(endpoint_id)
        gone = str(call.body.get("deployedModelId", ""))
        ids = {d["id"] for d in endpoint["deployedModels"]}
        if gone not in ids:
            raise ApiError(404, f"endpoint {endpoint_id} has no deployed model {gone!r}")
        rest = ids - {gone}
        if "trafficSplit" in call.body:
            split = self._check_split(call.body["trafficSplit"], rest, "undeploy", not rest)
        else:
            if endpoint["trafficSplit"].get(gone) and rest:
                raise ApiError(412, f"deployed model {gone} still has traffic")
            split = {k: v for k, v in endpoint["trafficSplit"].items() if k != gone}
        name = endpoint["name"]

        def effect() -> dict[str, Any]:
            endpoint["deployedModels"] = [d for d in endpoint["deployedModels"] if d["id"] != gone]
            endpoint["trafficSplit"] = split
            endpoint["updateTime"] = self._now()
            return {"@type": _TYPES + "UndeployModelResponse"}

        return self._operation(name, effect, call.verb)
