"""Window and split validated input rows by the order column; write train and eval sets.

The window is the latest ``training_window.rows`` rows by the order column (all rows if
null). The newest ``round(evaluation.fraction * window)`` rows of it are the evaluation
set; nothing is shuffled. Rows that tie on the order column keep their input order.
Each split must hold at least ``evaluation.min_rows`` rows and both label classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from components.artifacts import EVAL_FILE, SUMMARY_FILE, TRAIN_FILE, write_json
from components.preprocess.validation import check_split, read_inputs
from retrain.config import ModelSettings

__all__ = ["PreprocessResult", "preprocess"]


@dataclass(frozen=True)
class PreprocessResult:
    """Where the splits and the summary were written, and their sizes."""

    train_path: Path
    eval_path: Path
    summary_path: Path
    features: tuple[str, ...]
    train_rows: int
    eval_rows: int


def preprocess(uris: Sequence[str], settings: ModelSettings, output_dir: Path) -> PreprocessResult:
    """Validate ``uris``, select the window, split it, and write both splits to ``output_dir``."""
    inputs = read_inputs(uris, settings)
    order = settings.order_column
    ordered = inputs.frame.sort_values(order, kind="stable", ignore_index=True)
    requested = settings.training_window.rows
    window = ordered.tail(requested) if requested else ordered
    eval_rows = round(len(window) * settings.evaluation.fraction)
    train = window.iloc[: len(window) - eval_rows].reset_index(drop=True)
    evaluation = window.iloc[len(window) - eval_rows :].reset_index(drop=True)
    check_split(uris, settings, train, evaluation)

    output_dir.mkdir(parents=True, exist_ok=True)
    result = PreprocessResult(
        train_path=output_dir / TRAIN_FILE,
        eval_path=output_dir / EVAL_FILE,
        summary_path=output_dir / SUMMARY_FILE,
        features=inputs.features,
        train_rows=len(train),
        eval_rows=len(evaluation),
    )
    train.to_parquet(result.train_path, index=False)
    evaluation.to_parquet(result.eval_path, index=False)
    write_json(
        result.summary_path,
        {
            "inputs": [{"uri": uri, "rows": rows} for uri, rows in inputs.rows],
            "input_rows": len(ordered) + inputs.unlabelled,
            "unlabelled_rows_dropped": inputs.unlabelled,
            "label": settings.label,
            "order_column": order,
            "features": list(inputs.features),
            "categorical": [c for c in inputs.features if c in settings.categorical],
            "dropped_features": list(inputs.dropped),
            "skipped": [
                {"uri": e.obj, "rule": str(e.rule), "columns": list(e.columns), "error": str(e)}
                for e in inputs.skipped
            ],
            "window": {"requested_rows": requested, **_span(window, order)},
            "train": {"file": TRAIN_FILE, **_span(train, order)},
            "eval": {"file": EVAL_FILE, **_span(evaluation, order)},
        },
    )
    return result


def _span(frame: pd.DataFrame, order: str) -> dict[str, Any]:
    column = frame[order]
    return {"rows": len(frame), "first": _scalar(column.iloc[0]), "last": _scalar(column.iloc[-1])}


def _scalar(value: Any) -> Any:
    """A JSON-ready order value: Python numbers stay numbers, timestamps become ISO text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value.item() if hasattr(value, "item") else value
