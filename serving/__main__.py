"""``python -m serving``: run the prediction service, in one process or several.

With ``--workers N`` (N > 1), uvicorn starts N worker processes on one listening socket; each
builds its own app from :func:`worker_app` (uvicorn needs an import string to start workers):
its own :class:`~serving.models.ModelStore`, its own
:class:`~serving.models.ChampionWatcher`, and so its own atomic champion swap.

A decision must reach every worker, but a Pub/Sub subscription hands each message to one
subscriber only. So each worker claims a slot, the lowest number free, by locking
``<cache dir>/.workers/<slot>.lock`` (the lock goes with the process, whatever ends it), and
listens on its own subscription ``<subscription>-<slot>``, made on the decisions topic if
missing. Slot numbers stay small and are reused by a worker that uvicorn restarts, so the
subscriptions do not pile up, and a restarted worker finds in its slot's subscription the
decisions published while it was down. With one worker the subscription is used as named.

Each process logs a sample of its answers (``models.<m>.serving.log_sample_rate``) through
its own :class:`~serving.prediction_log.PredictionLog`, named after the host and its pid, so
that the workers' objects never collide.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import typer
import uvicorn
from starlette.applications import Starlette
from threadpoolctl import threadpool_limits
from uvicorn.supervisors import Multiprocess

from retrain import blobstore, jsonlog, statedb
from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.options import ConfigOption
from serving.app import UVICORN_OPTIONS, create_app
from serving.collector import freeze_heap
from serving.dashboard import status
from serving.models import ChampionWatcher, ModelStore
from serving.prediction_log import PredictionLog, gcs_writer

# 10,000 instances of 8 full-precision floats are about 1.7 MB of JSON as lists and 2.5 MB as
# objects; 8 MiB leaves room for longer feature names. (Vertex AI's own limit is 1.5 MB.)
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# The resolved options, from `python -m serving` to its worker processes (internal).
_OPTIONS_ENV = "SERVING_WORKER_OPTIONS"
_slot_lock: IO[str] | None = None  # held for the worker's lifetime


@dataclass(frozen=True)
class ServerOptions:
    """What one server process needs; the same in every worker."""

    config: str
    poll_seconds: float
    subscription: str | None
    cache_dir: str | None
    max_body_bytes: int
    batch_window_ms: float


def build_app(options: ServerOptions, slot: int | None = None) -> Starlette:
    """The app of one process; ``slot``: this worker's slot (None: the only process)."""
    settings = load_settings(Path(options.config))
    db = statedb.database(settings)
    registry = FirestoreRegistry(db, settings.buckets.models)
    cache_dir = Path(options.cache_dir or settings.local.state_dir / "serving-cache")
    store = ModelStore(settings.models, registry, blobstore.download_dir, cache_dir)
    subscription = options.subscription or f"{settings.topics.model_decisions}-serving"
    watcher = ChampionWatcher(
        store,
        settings.project,
        subscription if slot is None else f"{subscription}-{slot}",
        poll_seconds=options.poll_seconds,
        template=None if slot is None else subscription,
    )
    ledger = FirestoreLedger(db)
    return create_app(
        settings,
        store,
        watcher=watcher,
        status=lambda: status(settings, registry, ledger),
        max_body_bytes=options.max_body_bytes,
        batch_window=options.batch_window_ms / 1000,
        prediction_log=PredictionLog.for_settings(settings, gcs_writer()),
    )


def claim_slot(folder: Path) -> tuple[int, IO[str]]:
    """The lowest slot number no live process holds, and its locked file (keep it open)."""
    folder.mkdir(parents=True, exist_ok=True)
    slot = 0
    while True:
        handle = (folder / f"{slot}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            slot += 1
            continue
        return slot, handle


def worker_app() -> Starlette:
    """The app of one worker process (uvicorn's factory, with ``--workers`` > 1)."""
    global _slot_lock
    options = ServerOptions(**json.loads(os.environ[_OPTIONS_ENV]))
    jsonlog.configure()
    settings = load_settings(Path(options.config))
    cache_dir = Path(options.cache_dir or settings.local.state_dir / "serving-cache")
    slot, _slot_lock = claim_slot(cache_dir / ".workers")
    threadpool_limits(limits=1)  # this process's event loop thread (see main)
    app = build_app(options, slot)
    freeze_heap()
    return app


def main(
    config: ConfigOption = Path("retrain.yaml"),
    host: Annotated[
        str, typer.Option(envvar="SERVING_HOST", show_envvar=True, help="Address to bind.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="SERVING_PORT", show_envvar=True, help="Port to bind.")
    ] = 8080,
    poll_seconds: Annotated[
        float,
        typer.Option(
            envvar="SERVING_POLL_SECONDS",
            show_envvar=True,
            min=0.1,
            help="Re-read every champion pointer this often, as a safety net for missed "
            "decisions (and the only mechanism if the subscription does not exist).",
        ),
    ] = 5.0,
    subscription: Annotated[
        str | None,
        typer.Option(
            envvar="SERVING_SUBSCRIPTION",
            show_envvar=True,
            help="Pull subscription on the model-decisions topic; a decision refreshes its "
            "model at once. Default: <topics.model_decisions>-serving. With several workers, "
            "worker k listens on <subscription>-<k>, made like this one if missing.",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="SERVING_CACHE_DIR",
            show_envvar=True,
            help="Where downloaded model folders are kept, one per artifact. "
            "Default: <local.state_dir>/serving-cache.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            envvar="SERVING_WORKERS",
            show_envvar=True,
            min=1,
            help="Worker processes, each with its own copy of every champion. "
            "`retrain up` passes local.serving_workers.",
        ),
    ] = 1,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            envvar="SERVING_MAX_BODY_BYTES",
            show_envvar=True,
            min=1,
            help="Refuse request bodies over this size (400). The default fits 10,000 "
            "instances of 8 full-precision numbers; Vertex AI's own limit is 1.5 MB.",
        ),
    ] = DEFAULT_MAX_BODY_BYTES,
    batch_window_ms: Annotated[
        float,
        typer.Option(
            envvar="SERVING_BATCH_WINDOW_MS",
            show_envvar=True,
            min=0.0,
            help="When busy, wait up to this long to gather concurrent requests for one "
            "version into one predict call (an idle server predicts at once); 0: predict "
            "what is queued without waiting.",
        ),
    ] = 1.0,
) -> None:
    """Serve each model's champion over the Vertex AI prediction REST shape.

    Google clients find the emulators through PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST
    and FIRESTORE_EMULATOR_HOST.
    """
    jsonlog.configure()
    options = ServerOptions(
        config=str(config.resolve()),
        poll_seconds=poll_seconds,
        subscription=subscription,
        cache_dir=None if cache_dir is None else str(cache_dir.resolve()),
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
    )
    load_settings(config)  # a bad config fails here, once, not in every worker
    common: dict[str, Any] = {
        "host": host, "port": port, "log_level": "warning", **UVICORN_OPTIONS
    }  # fmt: skip
    if workers == 1:
        app = build_app(options)
        freeze_heap()
        # One OpenMP thread: requests are small, and an idle OpenMP team that spins between
        # requests takes the cores that the event loop and the clients need. (The predict
        # threads set their own limit: it is per thread.)
        with threadpool_limits(limits=1):
            uvicorn.run(app, log_config=None, **common)
        return
    os.environ[_OPTIONS_ENV] = json.dumps(asdict(options))  # read by worker_app in each worker
    uvicorn_config = uvicorn.Config(
        "serving.__main__:worker_app", factory=True, workers=workers, log_config=None, **common
    )
    listening = uvicorn_config.bind_socket()
    # What uvicorn.run does with workers, and one more thing: the socket that uvicorn binds
    # has protocol 0, so asyncio does not set TCP_NODELAY on the connections it accepts, and
    # each response then waits for the client's delayed ACK (~40 ms a request). Accepted
    # connections inherit TCP_NODELAY from the listening socket.
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(uvicorn_config, sockets=[listening]).run()


if __name__ == "__main__":
    typer.run(main)
