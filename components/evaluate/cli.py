"""Command line of the evaluate component. Thin: parse, call the core, write the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from components._cli import fail
from components.artifacts import write_json
from components.evaluate.evaluation import EvaluationError, evaluate

__all__ = ["app"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    candidate: Annotated[
        Path,
        typer.Option(
            "--candidate",
            envvar="RETRAIN_CANDIDATE_DIR",
            show_envvar=True,
            help="Model directory of the candidate, as written by the train component.",
        ),
    ],
    eval_data: Annotated[
        str,
        typer.Option(
            "--eval-data",
            envvar="RETRAIN_EVAL_DATA",
            show_envvar=True,
            help="eval.parquet written by the preprocess component (local path or gs:// URI).",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            envvar="RETRAIN_METRICS_FILE",
            show_envvar=True,
            help="Where to write the metrics JSON: {candidate: {...}, champion: {...} | null}.",
        ),
    ],
    champion: Annotated[
        Path | None,
        typer.Option(
            "--champion",
            envvar="RETRAIN_CHAMPION_DIR",
            show_envvar=True,
            help="Model directory of the current champion; leave out for a model's first version.",
        ),
    ] = None,
) -> None:
    """Score the candidate (and the champion) on the same evaluation rows."""
    try:
        result = evaluate(candidate, eval_data, champion)
    except EvaluationError as exc:
        fail(exc)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, result.to_dict())
    for role, metrics in (("candidate", result.candidate), ("champion", result.champion)):
        if metrics is not None:
            typer.echo(
                f"{role}: roc_auc {metrics.roc_auc:.4f}, accuracy {metrics.accuracy:.4f} "
                f"on {metrics.rows} rows"
            )
    typer.echo(f"-> {output}")
