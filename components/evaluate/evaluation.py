"""Score a candidate model, and optionally the champion, on the same evaluation rows.

Each model directory is what the train component writes: ``model.joblib`` and
``metadata.json`` (features in order, label, classes). Classification metrics use a
0.5 threshold on the probability of the positive class (the model's second class).
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from components.artifacts import METADATA_FILE, MODEL_FILE, read_json
from components.dataio import DataReadError, read_table
from components.encoding import as_fitted, model_input
from components.rules import RuleError

__all__ = ["EvaluationError", "EvaluationResult", "ModelMetrics", "evaluate"]

THRESHOLD = 0.5
_LOAD_ERRORS = (OSError, EOFError, pickle.UnpicklingError, ImportError, AttributeError, ValueError)


class EvaluationError(RuleError):
    """Evaluation data or a model that cannot be scored; names the object, columns and rule."""


@dataclass(frozen=True)
class ModelMetrics:
    """One model's metrics on the evaluation rows."""

    roc_auc: float
    accuracy: float
    log_loss: float
    precision: float
    recall: float
    rows: int


@dataclass(frozen=True)
class EvaluationResult:
    """Candidate and champion metrics, computed on the same rows."""

    candidate: ModelMetrics
    champion: ModelMetrics | None
    champion_missing: tuple[str, ...] = ()
    """Features the champion needs that the evaluation rows lack (a schema change): then
    the champion is not scored, and the gate's ``on_schema_change`` decides."""

    def to_dict(self) -> dict[str, Any]:
        """``{"candidate": {...}, "champion": {...} | None, "champion_missing": [...]}``."""
        return {
            "candidate": asdict(self.candidate),
            "champion": asdict(self.champion) if self.champion else None,
            "champion_missing": list(self.champion_missing),
        }


def evaluate(
    candidate_dir: Path, eval_path: Path | str, champion_dir: Path | None = None
) -> EvaluationResult:
    """Score ``candidate_dir`` and, if given, ``champion_dir`` on ``eval_path`` (Parquet)."""
    candidate = _load(candidate_dir)
    champion = _load(champion_dir) if champion_dir is not None else None
    label = candidate.label
    if champion is not None and champion.label != label:
        raise EvaluationError(
            str(champion_dir),
            [champion.label],
            "label_mismatch",
            f"the champion predicts {champion.label!r}, the candidate {label!r}",
        )
    source = str(eval_path)
    try:
        frame = read_table(source, "parquet")
    except DataReadError as exc:
        raise EvaluationError(source, [], "unreadable", exc.reason) from exc
    _check_labels(source, frame, label)
    missing = [c for c in champion.features if c not in frame.columns] if champion else []
    return EvaluationResult(
        candidate=candidate.score(source, frame),
        champion=champion.score(source, frame) if champion and not missing else None,
        champion_missing=tuple(missing),
    )


@dataclass(frozen=True)
class _Model:
    directory: Path
    estimator: Any
    features: list[str]
    label: str
    categories: dict[str, list[str]]

    def score(self, source: str, frame: pd.DataFrame) -> ModelMetrics:
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise EvaluationError(
                source, missing, "missing_column", f"the model {self.directory} needs it"
            )
        classes = self.estimator.classes_.tolist()
        y = frame[self.label]
        unknown = sorted(set(y.unique().tolist()) - set(classes), key=repr)
        if unknown:
            raise EvaluationError(
                source,
                [self.label],
                "unknown_class",
                f"values {unknown} are not among the classes {classes} of {self.directory}",
            )
        try:
            x = model_input(frame, self.features, self.categories)
            proba = self.estimator.predict_proba(as_fitted(self.estimator, x))[:, 1]
        except ValueError as exc:
            raise EvaluationError(
                source, [], "unscorable", f"the model {self.directory} cannot score it: {exc}"
            ) from exc
        truth = (y == classes[1]).to_numpy().astype(np.int64)
        predicted = (proba >= THRESHOLD).astype(np.int64)
        return ModelMetrics(
            roc_auc=float(roc_auc_score(truth, proba)),
            accuracy=float(accuracy_score(truth, predicted)),
            log_loss=float(log_loss(truth, proba, labels=[0, 1])),
            precision=float(precision_score(truth, predicted, zero_division=0.0)),
            recall=float(recall_score(truth, predicted, zero_division=0.0)),
            rows=len(frame),
        )


def _load(directory: Path) -> _Model:
    try:
        metadata = read_json(directory / METADATA_FILE)
        estimator = joblib.load(directory / MODEL_FILE)
    except FileNotFoundError as exc:
        raise EvaluationError(
            str(directory), [], "unreadable", f"not a model directory: {exc.filename} is missing"
        ) from exc
    except _LOAD_ERRORS as exc:
        raise EvaluationError(str(directory), [], "unreadable", f"cannot load: {exc}") from exc
    return _Model(
        directory,
        estimator,
        list(metadata["features"]),
        str(metadata["label"]),
        dict(metadata.get("categories", {})),
    )


def _check_labels(source: str, frame: pd.DataFrame, label: str) -> None:
    if frame.empty:
        raise EvaluationError(source, [], "empty", "the evaluation data has no rows")
    if label not in frame.columns:
        raise EvaluationError(source, [label], "missing_column", "the label is not in the data")
    nulls = int(frame[label].isna().sum())
    if nulls:
        raise EvaluationError(source, [label], "null_values", f"{nulls} rows have no label")
    classes = frame[label].unique().tolist()
    if len(classes) < 2:
        raise EvaluationError(
            source,
            [label],
            "single_class",
            f"every evaluation row has the class {classes[0]!r}, so roc_auc is undefined; "
            "the evaluation set needs both classes",
        )
