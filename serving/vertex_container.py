"""``python -m serving.vertex_container``: one model version, served the way Vertex AI wants.

Vertex AI's prebuilt scikit-learn images load ``model.joblib`` with their own scikit-learn
and numpy; this server loads it with the versions the components train with (the image is
``serving/Dockerfile``, built from ``requirements.txt``). It serves exactly the folder it was
deployed with: no ``retrain.yaml``, no registry, no champion pointer.

The contract (Vertex AI sets these variables in the container):

- ``AIP_STORAGE_URI``: the model folder (``model.joblib`` + ``metadata.json``), a ``gs://``
  copy of the uploaded ``artifact_uri``; downloaded once at startup. A local folder also works.
- ``AIP_HTTP_PORT`` (default 8080): the port to listen on, on all interfaces.
- ``GET  $AIP_HEALTH_ROUTE`` (default ``/health``): 200 once the model is loaded and warmed,
  503 before (and, if loading failed, until the process exits).
- ``POST $AIP_PREDICT_ROUTE`` (default ``/predict``): ``{"instances": [...], "parameters"?}``
  -> ``{"predictions": [{"label", "probability"}, ...]}``, the per-instance shape of the local
  prediction server. Vertex AI adds ``deployedModelId``, ``model`` and ``modelVersionId``.

Loading, validation and prediction are :mod:`serving.models` and :mod:`serving.app`'s own;
errors use the same ``{"error": {"code", "message", "status"}}`` shape. If the model cannot be
loaded, the error is logged and the process exits with status 1, so the deployment fails with
that message in its logs instead of waiting out the health checks.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from threadpoolctl import threadpool_limits

from components.compute import available_cpus
from retrain import blobstore, jsonlog
from retrain.gatekeeper.registry import ModelVersion
from serving.app import (
    BATCH_WINDOW_SECONDS,
    UVICORN_OPTIONS,
    ApiError,
    JsonResponse,
    api_error,
    http_error,
    predictions_for,
)
from serving.batching import Batchers, predict_threads
from serving.collector import freeze_heap
from serving.models import Downloader, LoadedModel, ModelLoadError, load_model
from serving.predict_processes import PredictProcesses

__all__ = ["ALL_INTERFACES", "ContainerSettings", "create_app", "main", "model_folder", "serve"]

log = logging.getLogger(__name__)

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (inside the container: Vertex AI connects from outside it)


@dataclass(frozen=True)
class ContainerSettings:
    """What the container serves, and where; :func:`main` fills it from the environment."""

    storage_uri: str
    host: str = ALL_INTERFACES
    port: int = 8080
    health_route: str = "/health"
    predict_route: str = "/predict"
    model: str = "model"  # names the model in logs and errors only
    version: str = "unknown"

    def __post_init__(self) -> None:
        if not self.storage_uri:
            raise ValueError("AIP_STORAGE_URI is empty; it must name the model folder")
        if "://" in self.storage_uri and not self.storage_uri.startswith("gs://"):
            raise ValueError(
                f"AIP_STORAGE_URI {self.storage_uri!r}: expected a gs:// URI or a local folder"
            )
        for name, route in (
            ("AIP_HEALTH_ROUTE", self.health_route),
            ("AIP_PREDICT_ROUTE", self.predict_route),
        ):
            if not route.startswith("/"):
                raise ValueError(f"{name} must be a path starting with '/', got {route!r}")
        if self.health_route == self.predict_route:
            raise ValueError(
                f"AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE are both {self.health_route!r}"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"AIP_HTTP_PORT must be 1-65535, got {self.port}")


def model_folder(storage_uri: str, download: Downloader) -> Path:
    """The local model folder: a ``gs://`` folder downloaded to a new temp dir, or the path."""
    if storage_uri.startswith("gs://"):
        local = Path(tempfile.mkdtemp(prefix="vertex-model-"))
        download(storage_uri, local)
        return local
    return Path(storage_uri)


class _Served:
    """The one model, once loaded; or why it could not be."""

    def __init__(self) -> None:
        self.model: LoadedModel | None = None
        self.error: str | None = None


def _load(
    settings: ContainerSettings,
    download: Downloader,
    served: _Served,
    on_failure: Callable[[BaseException], None] | None,
) -> None:
    version = ModelVersion(settings.model, settings.version, settings.storage_uri)
    where = f"{settings.model} version {settings.version}"
    try:
        try:
            folder = model_folder(settings.storage_uri, download)
        except Exception as exc:
            raise ModelLoadError(f"{where}: cannot download {settings.storage_uri}: {exc}") from exc
        loaded = load_model(version, folder)
    except Exception as exc:
        log.exception("cannot serve %s from %s", where, settings.storage_uri)
        served.error = str(exc)
        if on_failure is not None:
            on_failure(exc)
        return
    served.model = loaded
    log.info(
        "serving %s from %s (features: %s)",
        where,
        settings.storage_uri,
        ", ".join(loaded.features),
    )


def create_app(
    settings: ContainerSettings,
    *,
    download: Downloader = blobstore.download_dir,
    on_failure: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The container's app. On startup a thread downloads, loads and warms the model while
    the health route answers 503; ``on_failure(exc)`` is called if that fails."""
    served = _Served()
    cpus = available_cpus()
    executor = predict_threads(cpus)
    processes = PredictProcesses(cpus)
    batchers = Batchers(executor, BATCH_WINDOW_SECONDS, cpus, processes)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        threading.Thread(
            target=_load,
            args=(settings, download, served, on_failure),
            name="model-loader",
            daemon=True,  # a hung download must not keep the process from stopping
        ).start()
        try:
            yield
        finally:
            executor.shutdown(wait=False)
            processes.close()

    def identity() -> dict[str, Any]:
        return {
            "model": settings.model,
            "version": settings.version,
            "storageUri": settings.storage_uri,
        }

    async def health(_: Request) -> Response:
        if served.model is not None:
            return JSONResponse({"status": "ready", **identity()})
        if served.error is not None:
            return JSONResponse(
                {"status": "failed", "error": served.error, **identity()}, status_code=503
            )
        return JSONResponse({"status": "loading", **identity()}, status_code=503)

    async def predict(request: Request) -> Response:
        loaded = served.model
        if loaded is None:
            message = (
                f"the model could not be loaded: {served.error}"
                if served.error is not None
                else "the model is still loading; retry once the health route answers 200"
            )
            raise ApiError(503, message, "UNAVAILABLE")
        return JsonResponse({"predictions": await predictions_for(loaded, request, batchers)})

    return Starlette(
        routes=[
            Route(settings.health_route, health, methods=["GET"]),
            Route(settings.predict_route, predict, methods=["POST"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )


def serve(settings: ContainerSettings, *, download: Downloader = blobstore.download_dir) -> int:
    """Run the server until it is stopped (0), or until the model fails to load (1)."""
    failed = threading.Event()

    def stop(_: BaseException) -> None:
        failed.set()
        server.should_exit = True

    app = create_app(settings, download=download, on_failure=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            log_config=None,
            **UVICORN_OPTIONS,
        )
    )
    freeze_heap()
    # One OpenMP thread per predict, as in `python -m serving`: requests are small, and an
    # idle OpenMP team that spins between requests takes the cores the event loop needs.
    with threadpool_limits(limits=1):
        server.run()
    return 1 if failed.is_set() else 0


def main(
    storage_uri: Annotated[
        str,
        typer.Option(
            envvar="AIP_STORAGE_URI",
            show_envvar=True,
            help="The model folder (model.joblib + metadata.json): gs://... or a local path.",
        ),
    ],
    host: Annotated[
        str, typer.Option(envvar="SERVING_HOST", show_envvar=True, help="Address to bind.")
    ] = ALL_INTERFACES,
    port: Annotated[
        int,
        typer.Option(
            envvar="AIP_HTTP_PORT", show_envvar=True, min=1, max=65535, help="Port to bind."
        ),
    ] = 8080,
    health_route: Annotated[
        str, typer.Option(envvar="AIP_HEALTH_ROUTE", show_envvar=True, help="Health check path.")
    ] = "/health",
    predict_route: Annotated[
        str, typer.Option(envvar="AIP_PREDICT_ROUTE", show_envvar=True, help="Prediction path.")
    ] = "/predict",
    model: Annotated[
        str,
        typer.Option(
            envvar="RETRAIN_MODEL", show_envvar=True, help="The model's name, for logs and errors."
        ),
    ] = "model",
    version: Annotated[
        str,
        typer.Option(
            envvar="RETRAIN_MODEL_VERSION",
            show_envvar=True,
            help="The version served, for logs and errors.",
        ),
    ] = "unknown",
) -> None:
    """Serve one model folder under Vertex AI's custom container contract."""
    jsonlog.configure()
    try:
        settings = ContainerSettings(
            storage_uri=storage_uri,
            host=host,
            port=port,
            health_route=health_route,
            predict_route=predict_route,
            model=model,
            version=version,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    code = serve(settings)
    if code:
        raise typer.Exit(code)


if __name__ == "__main__":
    typer.run(main)
