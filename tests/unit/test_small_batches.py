"""Small batches by treelite: scikit-learn's probabilities, or scikit-learn itself."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression

from components.train import train
from retrain.gatekeeper.registry import ModelVersion
from serving.models import load_model
from serving.small_batches import MAX_ROWS, check_matrix, small_batch_predictor
from tests.unit.test_serving import DATA, SETTINGS

pytestmark = pytest.mark.unit


def _data(rows: int = 400, nan_share: float = 0.1) -> tuple[Any, Any]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 4)) * [1, 10, 100, 0.01]
    x[:, 3] = np.round(x[:, 3], 3)  # repeated values: thresholds between them
    y = (x[:, 0] + x[:, 1] / 10 + rng.normal(size=rows) > 0).astype(int)
    x[rng.random(x.shape) < nan_share] = np.nan
    return x, y


def _fresh(rows: int) -> npt.NDArray[np.float64]:
    """Rows the check matrix never saw, NaNs included."""
    fresh: npt.NDArray[np.float64] = _data(rows, nan_share=0.2)[0] * 1.37
    return fresh


def test_a_boosted_model_answers_as_scikit_learn_on_rows_it_was_not_checked_on() -> None:
    x, y = _data()
    estimator = HistGradientBoostingClassifier(max_iter=50, random_state=0).fit(x, y)
    predict = small_batch_predictor(estimator, 4, allow_nan=True)
    assert predict is not None
    for rows in (1, 8, MAX_ROWS, 1000):
        fresh = _fresh(rows)
        np.testing.assert_allclose(
            predict(fresh), estimator.predict_proba(fresh)[:, 1], rtol=0, atol=1e-12
        )


def test_a_forest_answers_as_scikit_learn() -> None:
    x, y = _data(nan_share=0)
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y)
    predict = small_batch_predictor(estimator, 4, allow_nan=False)
    assert predict is not None
    fresh = np.nan_to_num(_fresh(200))
    np.testing.assert_allclose(
        predict(fresh), estimator.predict_proba(fresh)[:, 1], rtol=0, atol=1e-12
    )


def test_what_treelite_cannot_import_stays_with_scikit_learn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y = _data(nan_share=0)
    caplog.set_level(logging.INFO, "serving.small_batches")
    assert small_batch_predictor(LogisticRegression().fit(x, y), 4, allow_nan=False) is None
    assert "LogisticRegression: predicted by scikit-learn only" in caplog.text


class _Shifted(HistGradientBoostingClassifier):  # type: ignore[misc]
    """scikit-learn's answers moved by 1e-6: treelite's import no longer matches them."""

    def predict_proba(self, x: Any) -> Any:
        return super().predict_proba(x) + np.array([-1e-6, 1e-6])


def test_answers_that_differ_on_the_check_matrix_are_not_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y = _data()
    estimator = _Shifted(max_iter=10, random_state=0).fit(x, y)
    assert small_batch_predictor(estimator, 4, allow_nan=True) is None
    assert "differ from scikit-learn's by up to 1e-06" in caplog.text


def test_the_check_matrix_holds_every_threshold_either_side_and_nan() -> None:
    x, y = _data()
    estimator = HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(x, y)
    check = check_matrix(estimator, 4, allow_nan=True)
    for j in range(4):
        thresholds = estimator._bin_mapper.bin_thresholds_[j]
        column = check[:, j]
        for value in (thresholds[0], np.nextafter(thresholds[-1], np.inf)):
            assert value in column
        assert np.isnan(column).any()
    assert not np.isnan(check_matrix(estimator, 4, allow_nan=False)).any()


def test_a_loaded_rainfall_model_predicts_small_batches_by_treelite(tmp_path: Path) -> None:
    rows = pd.read_csv(DATA, nrows=600).rename(columns={"Unnamed: 0": "day"})
    rows.to_parquet(tmp_path / "train.parquet")
    folder = train(tmp_path / "train.parquet", SETTINGS.models["rainfall"], tmp_path / "v1")
    loaded = load_model(ModelVersion("rainfall", "1", "gs://x"), folder.model_path.parent)
    assert loaded.small is not None
    estimator = joblib.load(folder.model_path.parent / "model.joblib")
    x = pd.read_csv(DATA, skiprows=range(1, 1000), nrows=300)[list(loaded.features)]
    matrix = x.to_numpy(dtype=np.float64)
    for size in (1, MAX_ROWS, MAX_ROWS + 1, 300):  # treelite up to MAX_ROWS, then sklearn
        got = loaded.probabilities(matrix[:size])
        np.testing.assert_allclose(got, estimator.predict_proba(x[:size])[:, 1], rtol=0, atol=1e-12)
