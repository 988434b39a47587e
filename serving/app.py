"""The prediction service's HTTP app, in the shape of the Vertex AI prediction REST API.

Routes (``{model}`` is a model name from ``retrain.yaml``; the endpoint is named after it):

- ``POST /v1/projects/{project}/locations/{location}/endpoints/{model}:predict``
- ``GET  /v1/projects/{project}/locations/{location}/endpoints/{model}``
- ``POST /v1/projects/{project}/locations/{location}/models/{model}@{version}:predict``
- ``GET  /healthz``

Errors use Google's JSON error shape: ``{"error": {"code", "message", "status"}}``.

Every predict response carries ``X-Request-Id``: the request's own (1 to 128 printable ASCII
characters; anything else is a 400 naming the header) or a new one (a uuid4 in hex). The body
keeps Vertex AI's shape. While a model's champion is a canary, the endpoint's requests are
split between the canary and the previous champion by a hash of the request id (see
:class:`serving.models.Serving`); the pinned route ``models/{model}@{version}`` is never
split. A sample of the answers is logged (:mod:`serving.prediction_log`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from components.compute import available_cpus
from retrain.config import Settings
from serving.batching import Batchers, predict_threads
from serving.dashboard import PAGE
from serving.models import ChampionWatcher, InstanceError, LoadedModel, ModelStore
from serving.predict_processes import PredictProcesses
from serving.prediction_log import PredictionLog

__all__ = [
    "BATCH_WINDOW_SECONDS",
    "MAX_BODY_BYTES",
    "MAX_REQUEST_ID_CHARS",
    "REQUEST_ID_HEADER",
    "ApiError",
    "api_error",
    "create_app",
    "http_error",
    "predictions_for",
    "request_id",
]

log = logging.getLogger(__name__)

# Vertex AI's online prediction request limit (1.5 MB): the default here, and the limit of
# the Vertex AI container, whose requests Vertex AI has checked already. `python -m serving`
# sets its own (--max-body-bytes), sized for 10,000-row requests.
MAX_BODY_BYTES = 1_500_000
# How long a batch may wait for requests still on their way, when the server is busy.
BATCH_WINDOW_SECONDS = 0.001
# Bodies up to this size are parsed and turned into a matrix on the event loop: a hop to the
# threadpool costs more than the work. Larger ones go to the threadpool in one hop.
INLINE_MAX_BODY_BYTES = 16_384

# How uvicorn runs our app, in `python -m serving` and the Vertex AI container: uvloop's event
# loop and httptools' HTTP parser (C) instead of asyncio's and h11's (pure Python). Measured at
# 1-row requests, concurrency 1: 0.3 ms less per request (docs/benchmarks.md).
UVICORN_OPTIONS: dict[str, Any] = {"loop": "uvloop", "http": "httptools"}

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower()
_REQUEST_ID_RAW = _REQUEST_ID_KEY.encode()

_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


class ApiError(Exception):
    """An answer in Google's error shape; ``status`` defaults from the HTTP code."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or _STATUS.get(code, "UNKNOWN")

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message, "status": self.status}}
        return JSONResponse(body, status_code=self.code)


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body; 400 if over ``limit`` bytes (declared or read) or cut short."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise _bad(f"Content-Length {declared!r} is not a number") from None
        if length > limit:
            raise _bad(f"request body is {length} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _bad(
                    f"request body is over the {limit}-byte limit (read {size} bytes so far)"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise _bad("the client disconnected before sending the whole body") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 if not JSON or not an object.

    orjson parses; when it refuses a body, the standard library's parser says why (the same
    messages as ever), or reads what orjson does not (integers beyond 64 bits).
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _bad(
            'request body must be a JSON object like {"instances": [...]}, '
            f"got {type(value).__name__}"
        )
    return value


def _instances(body: dict[str, Any]) -> list[Any]:
    if "instances" not in body:
        raise _bad('request body has no "instances" field')
    instances = body["instances"]
    if not isinstance(instances, list):
        raise _bad(f'"instances" must be a list, got {type(instances).__name__}')
    if not instances:
        raise _bad('"instances" is empty; send at least one instance')
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _bad(f'"parameters" must be an object, got {type(parameters).__name__}')
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r} in the request body")
    return instances


def _matrix(loaded: LoadedModel, raw: bytes) -> tuple[list[Any], npt.NDArray[np.float64]]:
    """The request's instances and their float matrix for ``loaded``, or a 400 naming what
    is wrong."""
    instances = _instances(_parse_json(raw))
    try:
        return instances, loaded.matrix(instances)
    except InstanceError as exc:
        raise _bad(str(exc)) from None


async def _request_matrix(
    loaded: LoadedModel, request: Request, max_body_bytes: int
) -> tuple[list[Any], npt.NDArray[np.float64]]:
    raw = await _read_body(request, max_body_bytes)
    if len(raw) <= INLINE_MAX_BODY_BYTES:
        return _matrix(loaded, raw)
    return await run_in_threadpool(_matrix, loaded, raw)


def request_id(request: Request) -> str:
    """The request's ``X-Request-Id`` (400 if it is not 1 to 128 printable ASCII
    characters), or a new one."""
    given = request.headers.get(_REQUEST_ID_KEY)
    if given is None:
        return uuid.uuid4().hex
    if 0 < len(given) <= MAX_REQUEST_ID_CHARS and given.isascii() and given.isprintable():
        return given
    shown = given if len(given) <= 40 else given[:37] + "..."
    raise _bad(
        f"header {REQUEST_ID_HEADER} must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII "
        f"characters, got {len(given)} characters: {shown!r}"
    )


async def predictions_for(
    loaded: LoadedModel,
    request: Request,
    batchers: Batchers,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[dict[str, Any]]:
    """The predictions for a predict request's body (Vertex AI's shape), or an
    :class:`ApiError` naming what is wrong with it; predicted in a batch by ``batchers``."""
    _, x = await _request_matrix(loaded, request, max_body_bytes)
    return loaded.predictions(await batchers.probabilities(loaded, x))


class JsonResponse(Response):
    """A JSON response encoded by orjson (what Starlette's JSONResponse sends, faster)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class _Api:
    """The route handlers, bound to one project, region and store."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        batchers: Batchers,
        max_body_bytes: int,
        prediction_log: PredictionLog | None,
    ) -> None:
        self.project = settings.project
        self.region = settings.region
        self.store = store
        self.batchers = batchers
        self.max_body_bytes = max_body_bytes
        self.prediction_log = prediction_log

    def model_name(self, model: str) -> str:
        return f"projects/{self.project}/locations/{self.region}/models/{model}"

    def check_scope(self, request: Request) -> str:
        """The model the path names; 404 for another project or region, or an unknown model."""
        params = request.path_params
        if params["project"] != self.project or params["location"] != self.region:
            raise ApiError(
                404,
                f"projects/{params['project']}/locations/{params['location']} is not served "
                f"here; this server serves projects/{self.project}/locations/{self.region}",
            )
        model: str = params["model"]
        if model not in self.store:
            raise ApiError(
                404,
                f"endpoint {model!r} not found; served models: {', '.join(self.store.models)}",
            )
        return model

    async def answer(self, loaded: LoadedModel, request: Request, request_id: str) -> Response:
        instances, x = await _request_matrix(loaded, request, self.max_body_bytes)
        predictions = loaded.predictions(await self.batchers.probabilities(loaded, x))
        version = loaded.version.version
        logged = self.prediction_log
        if logged is not None and logged.sampled(loaded.name, len(x)):
            logged.append(request_id, loaded.name, version, instances, predictions)
        response = JsonResponse(
            {
                "predictions": predictions,
                "deployedModelId": version,
                "model": self.model_name(loaded.name),
                "modelVersionId": version,
            }
        )
        response.raw_headers.append((_REQUEST_ID_RAW, request_id.encode()))
        return response

    async def predict(self, request: Request) -> Response:
        """The endpoint: the champion answers, or during a canary the version the request
        id routes to."""
        rid = request_id(request)
        try:
            return await self.answer(self.routed(request, rid), request, rid)
        except ApiError as exc:
            return _with_id(exc.response(), rid)

    def routed(self, request: Request, rid: str) -> LoadedModel:
        model = self.check_scope(request)
        state = self.store.serving(model)  # taken once: a swap mid-request does not matter
        if state is None:
            raise ApiError(
                404, f"endpoint {model!r} has no deployed model yet: {model} has no champion"
            )
        return state.route(rid)

    async def predict_version(self, request: Request) -> Response:
        """One version, named in the path (never split)."""
        rid = request_id(request)
        try:
            return await self.answer(await self.pinned(request), request, rid)
        except ApiError as exc:
            return _with_id(exc.response(), rid)

    async def pinned(self, request: Request) -> LoadedModel:
        model = self.check_scope(request)
        version: str = request.path_params["version"]
        loaded = self.store.cached_pinned(model, version)
        if loaded is None:
            try:
                loaded = await run_in_threadpool(self.store.pinned, model, version)
            except Exception as exc:
                log.exception("loading %s version %s failed", model, version)
                raise ApiError(
                    503, f"{model} version {version} cannot be loaded: {exc}", "UNAVAILABLE"
                ) from exc
        if loaded is None:
            raise ApiError(404, f"model {model!r} has no version {version!r}")
        return loaded

    async def endpoint(self, request: Request) -> Response:
        model = self.check_scope(request)
        state = self.store.serving(model)
        deployed = []
        split: dict[str, int] = {}
        if state is not None:
            for loaded in state.loaded():
                version = loaded.version.version
                deployed.append(
                    {
                        "id": version,
                        "model": self.model_name(model),
                        "modelVersionId": version,
                        "displayName": f"{model}@{version}",
                        "createTime": loaded.loaded_at.isoformat().replace("+00:00", "Z"),
                    }
                )
            split = state.split()
        return JSONResponse(
            {
                "name": f"projects/{self.project}/locations/{self.region}/endpoints/{model}",
                "displayName": model,
                "deployedModels": deployed,
                "trafficSplit": split,
            }
        )

    async def healthz(self, _: Request) -> Response:
        """The versions served; the header names the process (one of several workers)."""
        return JSONResponse(
            {"status": "ok", "models": self.store.versions()},
            headers={"X-Serving-Process": str(os.getpid())},
        )


def _with_id(response: Response, rid: str) -> Response:
    response.raw_headers.append((_REQUEST_ID_RAW, rid.encode()))
    return response


async def api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # noqa: S101 (registered for ApiError only)
    return exc.response()


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, in the same error shape."""
    assert isinstance(exc, HTTPException)  # noqa: S101 (registered for HTTPException only)
    message = {
        404: f"{request.url.path}: no such resource",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    error = ApiError(exc.status_code, message)
    response = error.response()
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def create_app(
    settings: Settings,
    store: ModelStore,
    *,
    watcher: ChampionWatcher | None = None,
    load_on_startup: bool = True,
    status: Callable[[], dict[str, Any]] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    batch_window: float = BATCH_WINDOW_SECONDS,
    parallel_predicts: int | None = None,
    prediction_log: PredictionLog | None = None,
) -> Starlette:
    """The app serving ``store``'s models for ``settings.project`` / ``settings.region``.

    On startup it loads every champion (``load_on_startup``) and then starts ``watcher``;
    on shutdown it stops the watcher's threads. A request body over ``max_body_bytes`` is
    refused. Concurrent predictions for one version are batched (:mod:`serving.batching`):
    a busy server waits up to ``batch_window`` seconds to fill a batch; 0 predicts what is
    queued without waiting. At most ``parallel_predicts`` batches of one version predict at
    once (default: the CPUs this process may use), large ones in as many predict processes
    (:mod:`serving.predict_processes`, started on the first large batch).
    ``prediction_log`` (None: nothing is logged) receives the sampled answers; it starts
    with the app and is flushed and stopped at shutdown.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    parallel = parallel_predicts or available_cpus()
    executor = predict_threads(parallel)
    processes = PredictProcesses(parallel)
    batchers = Batchers(executor, batch_window, parallel, processes)
    api = _Api(settings, store, batchers, max_body_bytes, prediction_log)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if load_on_startup:
            await run_in_threadpool(store.refresh_all)
        if watcher is not None:
            watcher.start()
        if prediction_log is not None:
            prediction_log.start()
        try:
            yield
        finally:
            if watcher is not None:
                await run_in_threadpool(watcher.stop)
            if prediction_log is not None:
                await run_in_threadpool(prediction_log.close)
            executor.shutdown(wait=False)
            processes.close()

    async def page(_: Request) -> Response:
        return HTMLResponse(PAGE)

    async def status_json(_: Request) -> Response:
        if status is None:
            raise ApiError(404, "this server has no status source")
        return JSONResponse(await run_in_threadpool(status))

    prefix = "/v1/projects/{project}/locations/{location}"
    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/api/status", status_json, methods=["GET"]),
            Route("/healthz", api.healthz, methods=["GET"]),
            Route(prefix + "/endpoints/{model}:predict", api.predict, methods=["POST"]),
            Route(prefix + "/endpoints/{model}", api.endpoint, methods=["GET"]),
            Route(
                prefix + "/models/{model}@{version}:predict", api.predict_version, methods=["POST"]
            ),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.batchers = api.batchers  # each version's batcher, for figures and tests
    app.state.prediction_log = prediction_log
    return app
