"""``python -m serving``: run the prediction service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from retrain.config import load_settings
from retrain.options import ConfigOption
from serving.app import create_app


def main(
    config: ConfigOption = Path("retrain.yaml"),
    host: Annotated[
        str, typer.Option(envvar="SERVING_HOST", help="Address to bind.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SERVING_PORT", help="Port to bind.")] = 8080,
) -> None:
    """Serve each model's champion over the Vertex AI prediction REST shape."""
    uvicorn.run(create_app(load_settings(config)), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    typer.run(main)
