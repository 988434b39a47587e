"""components.evaluate: candidate and champion metrics on the same evaluation rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import joblib
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from components.evaluate import EvaluationError, evaluate
from components.preprocess import PreprocessResult
from components.train import TrainResult, train
from retrain.config import ModelSettings


@pytest.fixture
def champion_dir(
    settings_for: Callable[..., ModelSettings], rainfall_prepared: PreprocessResult, tmp_path: Path
) -> Path:
    """A LogisticRegression on two features only: the champion has its own feature list."""
    settings = settings_for(
        "rainfall",
        features=["temperature", "dew point"],
        estimator={"name": "LogisticRegression", "params": {}},
    )
    return train(rainfall_prepared.train_path, settings, tmp_path / "champion").model_path.parent


def write_eval(prepared: PreprocessResult, directory: Path, **columns: object) -> Path:
    frame = pd.read_parquet(prepared.eval_path).assign(**columns)
    path = directory / "eval.parquet"
    frame.to_parquet(path, index=False)
    return path


@pytest.mark.unit
def test_candidate_alone(rainfall_model: TrainResult, rainfall_prepared: PreprocessResult) -> None:
    result = evaluate(rainfall_model.model_path.parent, rainfall_prepared.eval_path)

    evaluation = pd.read_parquet(rainfall_prepared.eval_path)
    model = joblib.load(rainfall_model.model_path)
    proba = model.predict_proba(evaluation[list(rainfall_model.features)])[:, 1]
    assert result.champion is None
    assert result.candidate.rows == 120
    assert result.candidate.roc_auc == pytest.approx(roc_auc_score(evaluation["rain"], proba))
    assert result.candidate.accuracy == pytest.approx(
        accuracy_score(evaluation["rain"], proba >= 0.5)
    )
    assert result.candidate.log_loss > 0
    assert 0 <= result.candidate.precision <= 1
    assert 0 <= result.candidate.recall <= 1
    assert result.to_dict() == {
        "candidate": {
            "roc_auc": result.candidate.roc_auc,
            "accuracy": result.candidate.accuracy,
            "log_loss": result.candidate.log_loss,
            "precision": result.candidate.precision,
            "recall": result.candidate.recall,
            "rows": 120,
        },
        "champion": None,
        "champion_missing": [],
    }


@pytest.mark.unit
def test_candidate_and_champion_on_the_same_rows(
    rainfall_model: TrainResult, rainfall_prepared: PreprocessResult, champion_dir: Path
) -> None:
    alone = evaluate(rainfall_model.model_path.parent, rainfall_prepared.eval_path)

    both = evaluate(rainfall_model.model_path.parent, rainfall_prepared.eval_path, champion_dir)

    assert both.candidate == alone.candidate
    assert both.champion is not None
    assert both.champion.rows == both.candidate.rows == 120
    assert both.champion.roc_auc != both.candidate.roc_auc


@pytest.mark.unit
def test_a_champion_that_needs_a_dropped_feature_is_not_scored_and_says_which(
    settings_for: Callable[..., ModelSettings],
    rainfall_prepared: PreprocessResult,
    champion_dir: Path,
) -> None:
    frame = pd.read_parquet(rainfall_prepared.eval_path).drop(columns=["dew point"])
    path = rainfall_prepared.eval_path.with_name("without-dew-point.parquet")
    frame.to_parquet(path, index=False)
    candidate = train(  # the candidate was trained on what the data has now
        rainfall_prepared.train_path,
        settings_for("rainfall", features=["temperature"]),
        path.parent / "candidate",
    ).model_path.parent

    result = evaluate(candidate, path, champion_dir)

    assert result.champion is None
    assert result.champion_missing == ("dew point",)
    assert result.candidate.rows == 120


@pytest.mark.unit
def test_single_class_evaluation_set_is_an_error(
    rainfall_model: TrainResult, rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    path = write_eval(rainfall_prepared, tmp_path, rain=0)

    with pytest.raises(EvaluationError) as caught:
        evaluate(rainfall_model.model_path.parent, path)

    message = str(caught.value)
    assert str(path) in message
    assert "'rain'" in message
    assert "rule single_class" in message
    assert "roc_auc is undefined" in message


@pytest.mark.unit
def test_unknown_class_in_the_evaluation_set_is_an_error(
    rainfall_model: TrainResult, rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    evaluation = pd.read_parquet(rainfall_prepared.eval_path)
    evaluation.loc[0, "rain"] = 2
    path = tmp_path / "eval.parquet"
    evaluation.to_parquet(path, index=False)

    with pytest.raises(EvaluationError, match=r"'rain': rule unknown_class: values \[2\]"):
        evaluate(rainfall_model.model_path.parent, path)


@pytest.mark.unit
def test_feature_missing_from_the_evaluation_set_is_an_error(
    rainfall_model: TrainResult, rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    evaluation = pd.read_parquet(rainfall_prepared.eval_path).drop(columns=["visibility"])
    path = tmp_path / "eval.parquet"
    evaluation.to_parquet(path, index=False)

    with pytest.raises(EvaluationError) as caught:
        evaluate(rainfall_model.model_path.parent, path)

    assert f"{path}: column 'visibility': rule missing_column" in str(caught.value)


@pytest.mark.unit
def test_a_directory_without_a_model_is_an_error(
    rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    with pytest.raises(EvaluationError, match="rule unreadable: not a model directory") as caught:
        evaluate(tmp_path, rainfall_prepared.eval_path)

    assert str(tmp_path) in str(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)
