"""Command line of the preprocess component. Thin: parse, load settings, call the core."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from components._cli import ConfigOption, ModelOption, fail, model_settings
from components.preprocess.preprocessing import preprocess
from components.preprocess.validation import ValidationError

__all__ = ["app"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    inputs: Annotated[
        list[str],
        typer.Option(
            "--input",
            "-i",
            envvar="RETRAIN_INPUTS",
            show_envvar=True,
            help="Input object: a local path or gs:// URI. Repeat for several; in the env var, "
            "separate them with spaces.",
        ),
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            "--output-dir",
            "-o",
            envvar="RETRAIN_PREPROCESS_DIR",
            show_envvar=True,
            help="Directory for train.parquet, eval.parquet and summary.json (created if needed).",
        ),
    ],
    model: ModelOption,
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Validate input objects, select the training window, and split it by order."""
    settings = model_settings(config, model)
    try:
        result = preprocess(inputs, settings, output_dir)
    except ValidationError as exc:
        fail(exc)
    typer.echo(
        f"{len(inputs)} input(s): {result.train_rows} train and {result.eval_rows} eval rows, "
        f"{len(result.features)} features -> {output_dir}"
    )
