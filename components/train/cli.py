"""Command line of the train component. Thin: parse, load settings, call the core."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from components._cli import ConfigOption, ModelOption, fail, model_settings
from components.dataio import DataReadError
from components.train.training import TrainingError, train

__all__ = ["app"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    train_data: Annotated[
        str,
        typer.Option(
            "--train-data",
            envvar="RETRAIN_TRAIN_DATA",
            show_envvar=True,
            help="train.parquet written by the preprocess component (local path or gs:// URI).",
        ),
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            "--output-dir",
            "-o",
            envvar="RETRAIN_MODEL_DIR",
            show_envvar=True,
            help="Model directory to write: model.joblib and metadata.json (created if needed).",
        ),
    ],
    model: ModelOption,
    config: ConfigOption = Path("retrain.yaml"),
    summary: Annotated[
        Path | None,
        typer.Option(
            "--summary",
            envvar="RETRAIN_DATA_SUMMARY",
            show_envvar=True,
            help="summary.json written by preprocess; its input URIs and row counts become "
            "the model's lineage.",
        ),
    ] = None,
) -> None:
    """Fit the model's configured estimator and write a model directory."""
    settings = model_settings(config, model)
    try:
        result = train(train_data, settings, output_dir, summary_path=summary)
    except (TrainingError, DataReadError) as exc:
        fail(exc)
    typer.echo(
        f"{settings.estimator.name} fitted on {result.rows} rows, {len(result.features)} "
        f"features -> {output_dir}"
    )
