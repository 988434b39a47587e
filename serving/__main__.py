"""``python -m serving``: run the prediction service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from threadpoolctl import threadpool_limits

from retrain import blobstore, jsonlog, statedb
from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.options import ConfigOption
from serving.app import create_app
from serving.dashboard import status
from serving.models import ChampionWatcher, ModelStore

# 10,000 instances of 8 full-precision floats are about 1.7 MB of JSON as lists and 2.5 MB as
# objects; 8 MiB leaves room for longer feature names. (Vertex AI's own limit is 1.5 MB.)
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


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
            "model at once. Default: <topics.model_decisions>-serving.",
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
    settings = load_settings(config)
    db = statedb.database(settings)
    registry = FirestoreRegistry(db, settings.buckets.models)
    store = ModelStore(
        settings.models,
        registry,
        blobstore.download_dir,
        cache_dir or settings.local.state_dir / "serving-cache",
    )
    watcher = ChampionWatcher(
        store,
        settings.project,
        subscription or f"{settings.topics.model_decisions}-serving",
        poll_seconds=poll_seconds,
    )
    ledger = FirestoreLedger(db)
    app = create_app(
        settings,
        store,
        watcher=watcher,
        status=lambda: status(settings, registry, ledger),
        max_body_bytes=max_body_bytes,
        batch_window=batch_window_ms / 1000,
    )
    # One OpenMP thread per predict: requests are small, and an idle OpenMP team that spins
    # between requests takes the cores that the event loop and the clients need.
    with threadpool_limits(limits=1):
        uvicorn.run(app, host=host, port=port, log_level="warning", log_config=None)


if __name__ == "__main__":
    typer.run(main)
