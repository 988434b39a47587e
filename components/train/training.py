"""Fit the configured estimator on the training split and write a model directory.

The directory holds ``model.joblib`` (Vertex AI's layout for scikit-learn models, which
our serving container loads) and ``metadata.json``: features in order, label and classes, library
versions, the training data's lineage, and reference statistics for drift checks.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.base import ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder
from sklearn.utils import get_tags

from components.artifacts import METADATA_FILE, MODEL_FILE, read_json, write_json
from components.compute import thread_limit
from components.dataio import read_table
from components.encoding import categories, model_input, to_keys
from components.train.reference import category_reference, feature_reference
from retrain.config import ModelSettings

__all__ = [
    "ESTIMATORS",
    "TrainResult",
    "TrainingError",
    "build_estimator",
    "final_estimator",
    "train",
]

ESTIMATORS: dict[str, type[ClassifierMixin]] = {
    "HistGradientBoostingClassifier": HistGradientBoostingClassifier,
    "GradientBoostingClassifier": GradientBoostingClassifier,
    "RandomForestClassifier": RandomForestClassifier,
    "LogisticRegression": LogisticRegression,
}
METADATA_SCHEMA_VERSION = 1
_RANDOM_STATE = 0


class TrainingError(ValueError):
    """An estimator that cannot be built, or training data it cannot be fitted on."""


@dataclass(frozen=True)
class TrainResult:
    """The written model directory and what went into it."""

    model_path: Path
    metadata_path: Path
    features: tuple[str, ...]
    rows: int


def build_estimator(
    name: str, params: dict[str, Any], categorical: Sequence[bool] | None = None
) -> Any:
    """An unfitted ``name`` with ``params``; ``random_state`` defaults to 0 where it exists.

    ``categorical`` flags the input columns that hold category codes (see
    :mod:`components.encoding`): HistGradientBoostingClassifier takes them natively
    (``categorical_features``); the other estimators get them one-hot encoded, in a
    pipeline whose first step is the encoder (unseen codes: all-zero columns)."""
    try:
        cls = ESTIMATORS[name]
    except KeyError as exc:
        raise TrainingError(
            f"estimator.name: unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}"
        ) from exc
    valid = cls().get_params(deep=False)
    for param in params:
        if param not in valid:
            raise TrainingError(
                f"estimator.params: {name} has no parameter {param!r}; "
                f"valid: {', '.join(sorted(valid))}"
            )
    defaults = {"random_state": _RANDOM_STATE} if "random_state" in valid else {}
    if not categorical or not any(categorical):
        return cls(**(defaults | params))
    if cls is HistGradientBoostingClassifier:
        if "categorical_features" in params:
            raise TrainingError(
                "estimator.params: categorical_features: declare categorical features with "
                "the model's `categorical` list instead"
            )
        return cls(**(defaults | params | {"categorical_features": list(categorical)}))
    columns = [i for i, flag in enumerate(categorical) if flag]
    encoder = ColumnTransformer(
        [("categories", OneHotEncoder(handle_unknown="ignore"), columns)],
        remainder="passthrough",
    )
    return Pipeline([("encode", encoder), ("estimator", cls(**(defaults | params)))])


def final_estimator(model: Any) -> Any:
    """The classifier itself: the last step of a pipeline, or ``model``."""
    return model.steps[-1][1] if isinstance(model, Pipeline) else model


def train(
    train_path: Path | str,
    settings: ModelSettings,
    output_dir: Path,
    *,
    summary_path: Path | None = None,
) -> TrainResult:
    """Fit on ``train_path`` (Parquet from preprocess); write the model dir to ``output_dir``.

    ``summary_path`` is preprocess's ``summary.json``; its input URIs and row counts go
    into the metadata as lineage.
    """
    name = settings.estimator.name
    frame = read_table(str(train_path), "parquet")
    label, order = settings.label, settings.order_column
    features = tuple(
        settings.features
        if settings.features is not None
        else (str(c) for c in frame.columns if c not in (label, order))
    )
    missing = [c for c in (*features, label) if c not in frame.columns]
    if missing:
        raise TrainingError(f"{train_path}: columns {missing} are missing from the training data")
    keys = {c: to_keys(frame[c].tolist()) for c in features if c in settings.categorical}
    known = {c: categories(values) for c, values in keys.items()}
    estimator = build_estimator(name, settings.estimator.params, [c in known for c in features])
    x, y = model_input(frame, features, known), frame[label]
    classes = y.dropna().unique().tolist()
    if len(classes) != 2 or y.isna().any():
        raise TrainingError(
            f"{train_path}: column {label!r}: the label needs exactly two classes and no nulls, "
            f"found classes {classes} and {int(y.isna().sum())} nulls"
        )
    if not get_tags(final_estimator(estimator)).input_tags.allow_nan:
        nulls = [c for c in features if c not in known and x[c].isna().any()]
        if nulls:
            raise TrainingError(
                f"{train_path}: columns {nulls}: {name} does not accept missing values; "
                "fill them upstream or use HistGradientBoostingClassifier or "
                "RandomForestClassifier"
            )
    try:
        with thread_limit(settings.threads):
            estimator.fit(x.to_numpy() if known else x, y)
    except ValueError as exc:
        raise TrainingError(f"{train_path}: {name}.fit failed: {exc}") from exc

    output_dir.mkdir(parents=True, exist_ok=True)
    result = TrainResult(output_dir / MODEL_FILE, output_dir / METADATA_FILE, features, len(frame))
    joblib.dump(estimator, result.model_path)
    write_json(
        result.metadata_path,
        _metadata(
            estimator,
            settings=settings,
            x=x,
            y=y,
            keys=keys,
            known=known,
            train_path=train_path,
            summary_path=summary_path,
        ),
    )
    return result


def _metadata(
    estimator: Any,
    *,
    settings: ModelSettings,
    x: pd.DataFrame,
    y: pd.Series,
    keys: dict[str, list[str | None]],
    known: dict[str, list[str]],
    train_path: Path | str,
    summary_path: Path | None,
) -> dict[str, Any]:
    summary: dict[str, Any] = read_json(summary_path) if summary_path else {}
    params = dict(settings.estimator.params)
    if "random_state" in final_estimator(estimator).get_params(deep=False):
        params.setdefault("random_state", _RANDOM_STATE)
    counts = y.value_counts(normalize=True)
    classes = estimator.classes_.tolist()
    return {
        "schema_version": METADATA_SCHEMA_VERSION,
        "estimator": {"name": settings.estimator.name, "params": params},
        "features": list(x.columns),
        "categories": known,
        "label": settings.label,
        "classes": classes,
        "positive_class": classes[1],
        "order_column": settings.order_column,
        "versions": {
            "python": platform.python_version(),
            "sklearn": sklearn.__version__,
            "pandas": pd.__version__,
            "numpy": np.__version__,
            "joblib": joblib.__version__,
        },
        "training_data": {
            "file": str(train_path),
            "rows": len(x),
            "inputs": summary.get("inputs"),
            "window": summary.get("window"),
        },
        "reference": {
            "label": {"classes": classes, "proportions": [float(counts[c]) for c in classes]},
            "features": {
                column: category_reference(keys[column], known[column])
                if column in known
                else feature_reference(x[column].to_numpy())
                for column in x.columns
            },
        },
    }
