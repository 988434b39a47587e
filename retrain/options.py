"""Command-line options that every entry point shares (each falls back to an env var)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["ConfigOption"]

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        envvar="RETRAIN_CONFIG",
        show_envvar=True,
        help="Path to retrain.yaml.",
    ),
]
