"""Command-line options that every entry point shares (each falls back to an env var)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

__all__ = ["ConfigOption", "Output", "OutputOption"]

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

Output = Literal["table", "json"]

OutputOption = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        envvar="RETRAIN_OUTPUT",
        show_envvar=True,
        help="table: for people (whole, never cut, when piped); json: for scripts.",
    ),
]
