"""Small batches predicted by treelite's compiled-in tree walker instead of scikit-learn.

scikit-learn's tree ensembles pay a fixed cost per call (input validation, then a Python
loop over the trees: HistGradientBoosting's 200 trees take 1.6-3.5 ms for one row here),
which is most of a small request's time. treelite (https://treelite.readthedocs.io) imports
the fitted ensemble once, at load, and GTIL, its C++ predictor, walks the trees without
Python: one row in ~0.1 ms, 8 rows in ~0.4 ms. Its cost grows faster with rows than
scikit-learn's (1,000 rows: 40 ms against 13), so only batches of at most
:data:`MAX_ROWS` rows take it; larger ones stay with scikit-learn.

The answers must be scikit-learn's. At load, :func:`small_batch_predictor` predicts a check
matrix both ways: split thresholds of every feature (up to 16 each), and a hair either side
of them (where ``<=`` against ``<`` would show), NaNs where the estimator accepts them,
random rows over those values; it is used only if every probability agrees within :data:`TOLERANCE`.
An estimator treelite cannot import (a linear model, a pipeline) or that fails the check
is predicted by scikit-learn alone, with a log line saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_ROWS", "TOLERANCE", "Predictor", "check_matrix", "small_batch_predictor"]

log = logging.getLogger(__name__)

# Batches up to this many rows (measured crossover: ~110 rows on the 2-CPU machine).
MAX_ROWS = 64
# The largest difference from predict_proba allowed in the load-time check (seen: 1e-15).
TOLERANCE = 1e-9
# The check matrix: random rows, and per feature at most this many thresholds alone (evenly
# spread): ~700 rows for the rainfall model, ~0.1 s at load on an idle machine. A systematic
# difference (<= against <, float32 against float64, where NaN goes) shows on a few rows.
_CHECK_ROWS = 256
_SINGLE_THRESHOLDS = 16

Predictor = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]


def small_batch_predictor(estimator: Any, n_features: int, allow_nan: bool) -> Predictor | None:
    """P(positive class) for a batch, from treelite's import of ``estimator``; None where
    treelite cannot import it or its answers are not scikit-learn's on :func:`check_matrix`."""
    try:
        import treelite.gtil  # noqa: PLC0415 (0.3 s: only where a model is loaded)
        import treelite.sklearn  # noqa: PLC0415

        compiled = treelite.sklearn.import_model(estimator)
    except Exception as exc:  # noqa: BLE001 (not a tree ensemble treelite knows)
        log.info("%s: predicted by scikit-learn only (%s)", type(estimator).__name__, exc)
        return None

    # scikit-learn's own trees (forests, GradientBoosting) compare float32 inputs; its
    # HistGradientBoosting compares float64 ones.
    float32 = getattr(estimator, "_bin_mapper", None) is None

    def predict(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        if float32:
            x = x.astype(np.float32).astype(np.float64)
        out = np.asarray(treelite.gtil.predict(compiled, x, nthread=1), dtype=np.float64)
        # Binary: (rows, 1, 1) for boosting (P(positive)), (rows, 1, 2) for forests.
        return out.reshape(len(x), -1)[:, -1]

    check = check_matrix(estimator, n_features, allow_nan)
    try:
        got = predict(check)
        want = np.asarray(estimator.predict_proba(check)[:, 1], dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 (treelite refused the input: not used)
        log.warning("%s: treelite's prediction failed, predicted by scikit-learn only: %r",
                    type(estimator).__name__, exc)  # fmt: skip
        return None
    worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    if not worst <= TOLERANCE:
        log.warning("%s: treelite's probabilities differ from scikit-learn's by up to %g on "
                    "the check matrix; predicted by scikit-learn only",
                    type(estimator).__name__, worst)  # fmt: skip
        return None
    return predict


def check_matrix(estimator: Any, n_features: int, allow_nan: bool) -> npt.NDArray[np.float64]:
    """Rows over the split points: per feature, split thresholds (at most
    ``_SINGLE_THRESHOLDS``, the first and last among them) and their two float neighbours,
    plus 0 and NaN where accepted; combined at random into rows, then each such value alone
    in an otherwise-zero row."""
    rng = np.random.default_rng(0)
    values = [_feature_values(estimator, j, allow_nan) for j in range(n_features)]
    random = np.column_stack([rng.choice(v, _CHECK_ROWS) for v in values])
    single = [np.zeros(n_features)]
    for j, column in enumerate(values):
        for value in column:
            row = np.zeros(n_features)
            row[j] = value
            single.append(row)
    return np.vstack([random, *single]).astype(np.float64)


def _feature_values(estimator: Any, feature: int, allow_nan: bool) -> npt.NDArray[np.float64]:
    thresholds = _thresholds(estimator, feature)
    if len(thresholds) > _SINGLE_THRESHOLDS:
        spread = np.linspace(0, len(thresholds) - 1, _SINGLE_THRESHOLDS).round().astype(int)
        thresholds = thresholds[spread]
    around = [thresholds, np.nextafter(thresholds, -np.inf), np.nextafter(thresholds, np.inf)]
    extra = [0.0, np.nan] if allow_nan else [0.0]
    return np.concatenate([*around, extra])


def _thresholds(estimator: Any, feature: int) -> npt.NDArray[np.float64]:
    """The split thresholds on ``feature``: HistGradientBoosting's bin edges, or the
    thresholds of each fitted tree (forests, gradient boosting); none otherwise."""
    mapper = getattr(estimator, "_bin_mapper", None)
    if mapper is not None and feature < len(getattr(mapper, "bin_thresholds_", [])):
        return np.asarray(mapper.bin_thresholds_[feature], dtype=np.float64)
    trees = getattr(estimator, "estimators_", None)
    found: list[npt.NDArray[np.float64]] = []
    for tree in np.ravel(np.asarray(trees, dtype=object)) if trees is not None else []:
        inner = getattr(tree, "tree_", None)
        if inner is not None:
            found.append(inner.threshold[inner.feature == feature])
    return np.unique(np.concatenate(found)) if found else np.zeros(0)
