"""Has a newly arrived data object drifted from the champion's training data, or has the
champion degraded on it?

The on_data_arrival function calls these for models whose ``arrival_policy`` is
``on_drift`` or ``on_drift_or_degradation``. Both checks compare the new frame with what
the train step stored in the champion's ``metadata.json``:

* :func:`check_drift` compares each feature with its reference statistics
  (``metadata["reference"]["features"]``, see :mod:`components.train.reference`): the
  population stability index (PSI) over the stored decile bins, and a two-sample
  Kolmogorov-Smirnov test against the stored sample; a categorical feature, PSI over the
  training categories (and one "other" share for the rest) and a chi-squared test of the
  new counts against the training shares. A feature drifts if its PSI is above
  ``Drift.psi_threshold`` or its test's p-value is below ``Drift.ks_pvalue``; the object drifts
  if at least ``Drift.min_drifted_features`` features drift. Nulls are left out.
* :func:`check_degradation` scores the champion on the new rows, if they carry labels, and
  compares accuracy and ROC AUC with the champion's own evaluation figures.

scipy, scikit-learn, joblib and the train component are imported inside the functions that
need them, so a function process pays for them once, and only when a model uses a drift
policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from retrain.config import Drift

__all__ = [
    "EPSILON",
    "THRESHOLD",
    "DegradationReport",
    "DriftReport",
    "FeatureDrift",
    "check_degradation",
    "check_drift",
    "psi",
]

EPSILON = 1e-4
"""Share given to an empty bin (on either side) so that PSI stays finite."""
THRESHOLD = 0.5
"""Decision threshold on the probability of the positive class, as in evaluation."""


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's comparison with its reference statistics."""

    psi: float
    statistic: float
    pvalue: float
    drifted: bool
    rows: int
    """Non-null new values compared."""
    test: str = "ks"
    """``ks`` (two-sample Kolmogorov-Smirnov, numeric features) or ``chi2`` (chi-squared
    goodness of fit over the training categories, categorical features)."""


@dataclass(frozen=True)
class DriftReport:
    """The drift verdict on one data object, feature by feature.

    ``features`` holds every compared feature in the metadata's order; ``drifted_features``
    names the drifted ones, highest PSI first. ``skipped`` names features that could not be
    compared: no reference statistics (no non-null training values) or no non-null new
    values. ``rows`` is the number of rows in the new frame.
    """

    drifted: bool
    features: dict[str, FeatureDrift]
    drifted_features: list[str]
    rows: int
    min_drifted_features: int
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready for JSON (every float is finite)."""
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. ``2 of 8 features drifted (min 2): a psi 0.41 ks p=1e-12, ...``."""
        head = (
            f"{len(self.drifted_features)} of {len(self.features)} features drifted "
            f"(min {self.min_drifted_features})"
        )
        details = ", ".join(
            f"{name} psi {self.features[name].psi:.2f} "
            f"{self.features[name].test} p={self.features[name].pvalue:.2g}"
            for name in self.drifted_features
        )
        line = f"{head}: {details}" if details else head
        if self.skipped:
            line += f"; not compared: {', '.join(self.skipped)}"
        return line


@dataclass(frozen=True)
class DegradationReport:
    """The champion's metrics on labelled new rows against its own evaluation figures.

    ``metrics`` holds ``accuracy`` and, when the rows have both classes, ``roc_auc``.
    ``reference`` holds the figures compared with (those of ``metrics`` that
    ``reference_metrics`` gave). ``reasons`` explains each metric that fell too far.
    """

    degraded: bool
    metrics: dict[str, float]
    reference: dict[str, float]
    margin: float
    reasons: list[str]
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready for JSON."""
        return asdict(self)


def psi(expected: Any, actual: Any, epsilon: float = EPSILON) -> float:
    """Population stability index of bin shares ``actual`` against ``expected``.

    ``sum((a - e) * ln(a / e))``, i.e. the symmetrised relative entropy; empty bins count
    as ``epsilon`` so that the index stays finite.
    """
    from scipy.special import rel_entr  # noqa: PLC0415 (lazy: see the module doc)

    e = np.clip(np.asarray(expected, dtype=np.float64), epsilon, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), epsilon, None)
    if e.shape != a.shape:
        raise ValueError(f"bin shares differ in length: {e.size} expected, {a.size} actual")
    return float(np.sum(rel_entr(a, e) + rel_entr(e, a)))


def check_drift(frame: pd.DataFrame, metadata: dict[str, Any], policy: Drift) -> DriftReport:
    """Compare ``frame`` with the reference statistics in a champion's ``metadata``.

    Raises ValueError if ``frame`` lacks any of the metadata's features, or has no rows.
    """
    features = [str(name) for name in metadata["features"]]
    missing = [name for name in features if name not in frame.columns]
    if missing:
        raise ValueError(
            f"the new data lacks feature columns {missing} that the champion was trained on"
        )
    if frame.empty:
        raise ValueError("the new data has no rows")
    references: dict[str, Any] = metadata.get("reference", {}).get("features", {})
    compared: dict[str, FeatureDrift] = {}
    skipped: list[str] = []
    for name in features:
        reference = references.get(name, {})
        if reference.get("kind") == "categorical":
            result = _categorical_drift(frame[name], reference, policy)
        else:
            result = _numeric_drift(frame[name], reference, policy)
        if result is None:
            skipped.append(name)
        else:
            compared[name] = result
    drifted = sorted(
        (name for name, result in compared.items() if result.drifted),
        key=lambda name: (-compared[name].psi, compared[name].pvalue, name),
    )
    return DriftReport(
        drifted=len(drifted) >= policy.min_drifted_features,
        features=compared,
        drifted_features=drifted,
        rows=len(frame),
        min_drifted_features=policy.min_drifted_features,
        skipped=skipped,
    )


def _numeric_drift(
    column: pd.Series, reference: dict[str, Any], policy: Drift
) -> FeatureDrift | None:
    """PSI over the stored decile bins and a KS test against the stored sample."""
    from scipy.stats import ks_2samp  # noqa: PLC0415 (lazy: see the module doc)

    from components.train.reference import bin_proportions  # noqa: PLC0415 (pulls sklearn)

    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    values = values[~np.isnan(values)]
    if "bins" not in reference or "sample" not in reference or not values.size:
        return None
    edges = reference["bins"]["edges"]
    index = psi(reference["bins"]["proportions"], bin_proportions(values, edges))
    ks = ks_2samp(values, np.asarray(reference["sample"], dtype=np.float64))
    statistic, pvalue = float(ks.statistic), float(ks.pvalue)
    return FeatureDrift(
        psi=index,
        statistic=statistic,
        pvalue=pvalue,
        drifted=index > policy.psi_threshold or pvalue < policy.ks_pvalue,
        rows=int(values.size),
        test="ks",
    )


def _categorical_drift(
    column: pd.Series, reference: dict[str, Any], policy: Drift
) -> FeatureDrift | None:
    """PSI over the stored categories (and "other"), and a chi-squared goodness-of-fit test
    of the new counts against the training shares (empty training shares get ``EPSILON``)."""
    from scipy.stats import chisquare  # noqa: PLC0415 (lazy: see the module doc)

    from components.encoding import to_keys  # noqa: PLC0415
    from components.train.reference import category_proportions  # noqa: PLC0415

    keys = [k for k in to_keys(column.tolist()) if k is not None]
    if not keys or "proportions" not in reference:
        return None
    expected = np.clip(np.asarray(reference["proportions"], dtype=np.float64), EPSILON, None)
    expected = expected / expected.sum()
    actual = np.asarray(category_proportions(keys, reference["categories"]), dtype=np.float64)
    observed = actual * len(keys)
    test = chisquare(observed, expected * len(keys))
    statistic, pvalue = float(test.statistic), float(test.pvalue)
    index = psi(reference["proportions"], actual)
    return FeatureDrift(
        psi=index,
        statistic=statistic,
        pvalue=pvalue,
        drifted=index > policy.psi_threshold or pvalue < policy.ks_pvalue,
        rows=len(keys),
        test="chi2",
    )


def check_degradation(
    frame: pd.DataFrame,
    estimator: Any,
    metadata: dict[str, Any],
    reference_metrics: dict[str, float],
    margin: float,
) -> DegradationReport | None:
    """Score the champion (``estimator``, loaded from its ``model.joblib``) on the labelled
    rows of ``frame``.

    Returns None if ``frame`` has no label column or no labelled rows (rows with a null
    label are left out). With a single class present, ROC AUC is undefined: only accuracy
    is computed and compared. A metric is degraded if it is below its figure in
    ``reference_metrics`` (the champion's evaluation metrics) by more than ``margin``;
    metrics missing from ``reference_metrics`` are reported but not compared.

    Raises ValueError for missing feature columns, labels outside the model's classes,
    or rows the model cannot score.
    """
    from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: PLC0415

    label = str(metadata["label"])
    if label not in frame.columns:
        return None
    rows = frame[frame[label].notna()]
    if rows.empty:
        return None
    features = [str(name) for name in metadata["features"]]
    missing = [name for name in features if name not in rows.columns]
    if missing:
        raise ValueError(
            f"the new data lacks feature columns {missing} that the champion was trained on"
        )
    classes = estimator.classes_.tolist()
    unknown = sorted(set(rows[label].unique().tolist()) - set(classes), key=repr)
    if unknown:
        raise ValueError(
            f"column {label!r}: values {unknown} are not among the champion's classes {classes}"
        )
    from components.encoding import as_fitted, model_input  # noqa: PLC0415

    try:
        x = model_input(rows, features, metadata.get("categories", {}))
        proba = estimator.predict_proba(as_fitted(estimator, x))[:, 1]
    except ValueError as exc:
        raise ValueError(f"the champion cannot score the new data: {exc}") from exc
    truth = (rows[label] == classes[1]).to_numpy().astype(np.int64)
    predicted = (proba >= THRESHOLD).astype(np.int64)
    metrics = {"accuracy": float(accuracy_score(truth, predicted))}
    if np.unique(truth).size == 2:
        metrics["roc_auc"] = float(roc_auc_score(truth, proba))
    reference = {
        name: float(reference_metrics[name])
        for name in metrics
        if name in reference_metrics and math.isfinite(reference_metrics[name])
    }
    reasons = [
        f"{name} {metrics[name]:.2f} < {reference[name]:.2f} - {margin:.2f}"
        for name in metrics
        if name in reference and metrics[name] < reference[name] - margin
    ]
    return DegradationReport(
        degraded=bool(reasons),
        metrics=metrics,
        reference=reference,
        margin=margin,
        reasons=reasons,
        rows=len(rows),
    )
