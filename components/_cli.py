"""Options and error handling shared by the components' command lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from retrain.config import ConfigError, ModelSettings, load_settings
from retrain.options import ConfigOption

__all__ = ["ConfigOption", "ModelOption", "fail", "model_settings"]

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="RETRAIN_MODEL",
        show_envvar=True,
        help="Model name: a key under `models` in retrain.yaml.",
    ),
]


def model_settings(config: Path, model: str) -> ModelSettings:
    """The settings of ``model`` in ``config``; exit 2 with every problem on a bad file."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=2) from exc
    if model not in settings.models:
        known = ", ".join(sorted(settings.models))
        typer.echo(f"{config}: models: no model {model!r}; known: {known}", err=True)
        raise typer.Exit(code=2)
    return settings.models[model]


def fail(exc: Exception) -> NoReturn:
    """Report a data or model problem on stderr and exit 1."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=1) from exc
