"""components.train: the model directory, its metadata, reference statistics, estimators."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from components.artifacts import read_json
from components.preprocess import PreprocessResult, preprocess
from components.train import TrainingError, TrainResult, train
from components.train.reference import SAMPLE_SIZE, bin_proportions, feature_reference
from components.train.training import ESTIMATORS
from retrain import config
from retrain.config import ModelSettings


@pytest.mark.unit
def test_model_dir_holds_a_loadable_model_and_metadata(
    rainfall_model: TrainResult, rainfall_prepared: PreprocessResult
) -> None:
    model = joblib.load(rainfall_model.model_path)
    metadata = read_json(rainfall_model.metadata_path)
    evaluation = pd.read_parquet(rainfall_prepared.eval_path)

    assert sorted(p.name for p in rainfall_model.model_path.parent.iterdir()) == [
        "metadata.json",
        "model.joblib",
    ]
    assert list(model.feature_names_in_) == metadata["features"] == list(rainfall_model.features)
    proba = model.predict_proba(evaluation[metadata["features"]])
    assert proba.shape == (120, 2)
    assert metadata["label"] == "rain"
    assert metadata["classes"] == [0, 1]
    assert metadata["positive_class"] == 1
    assert metadata["estimator"] == {
        "name": "HistGradientBoostingClassifier",
        "params": {"max_iter": 20, "random_state": 0},
    }
    assert set(metadata["versions"]) >= {"python", "sklearn", "pandas", "numpy"}


@pytest.mark.unit
def test_metadata_carries_lineage_from_the_summary(
    rainfall_model: TrainResult, rainfall_prepared: PreprocessResult, rainfall_inputs: list[str]
) -> None:
    lineage = read_json(rainfall_model.metadata_path)["training_data"]

    assert lineage["file"] == str(rainfall_prepared.train_path)
    assert lineage["rows"] == 480
    assert [i["uri"] for i in lineage["inputs"]] == rainfall_inputs
    assert [i["rows"] for i in lineage["inputs"]] == [400, 800]
    assert lineage["window"]["rows"] == 600


@pytest.mark.unit
def test_reference_statistics_describe_the_training_split(
    rainfall_model: TrainResult, rainfall_prepared: PreprocessResult
) -> None:
    reference = read_json(rainfall_model.metadata_path)["reference"]
    training = pd.read_parquet(rainfall_prepared.train_path)

    assert reference["label"]["classes"] == [0, 1]
    assert reference["label"]["proportions"][1] == pytest.approx(training["rain"].mean())
    for column in rainfall_model.features:
        stats, values = reference["features"][column], training[column]
        assert stats["count"] == 480
        assert stats["missing"] == 0
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["min"] == values.min()
        assert stats["max"] == values.max()
        assert stats["quantiles"]["0.5"] == pytest.approx(values.median())
        edges = stats["bins"]["edges"]
        assert edges == sorted(edges)
        assert edges[0] == values.min()
        assert edges[-1] == values.max()
        assert len(stats["bins"]["proportions"]) == len(edges) - 1
        assert sum(stats["bins"]["proportions"]) == pytest.approx(1.0)
        assert sorted(stats["sample"]) == sorted(values.tolist())


@pytest.mark.unit
def test_feature_reference_samples_at_most_the_sample_size_and_counts_missing() -> None:
    values = np.concatenate([np.arange(5000, dtype=np.float64), [np.nan] * 7])

    stats = feature_reference(values)

    assert (stats["count"], stats["missing"]) == (5000, 7)
    assert len(stats["sample"]) == SAMPLE_SIZE
    assert set(stats["sample"]) <= set(range(5000))
    assert stats["bins"]["proportions"] == pytest.approx([0.1] * 10)
    assert feature_reference(values) == stats


@pytest.mark.unit
def test_constant_feature_has_one_bin() -> None:
    stats = feature_reference([2.0, 2.0, 2.0])

    assert stats["bins"] == {"edges": [2.0], "proportions": [1.0]}


@pytest.mark.unit
def test_bin_proportions_open_first_and_last_bins() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]

    shares = bin_proportions([-5.0, 0.0, 0.5, 1.0, 2.5, 3.0, 10.0, np.nan], edges)

    assert shares == pytest.approx([3 / 7, 1 / 7, 3 / 7])


@pytest.mark.unit
def test_estimator_table_matches_the_config() -> None:
    assert tuple(ESTIMATORS) == config.ESTIMATORS


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("HistGradientBoostingClassifier", {"max_iter": 10}),
        ("GradientBoostingClassifier", {"n_estimators": 10}),
        ("RandomForestClassifier", {"n_estimators": 10}),
        ("LogisticRegression", {"C": 0.5}),
    ],
)
def test_every_estimator_trains_with_its_params(
    settings_for: Callable[..., ModelSettings],
    rainfall_prepared: PreprocessResult,
    tmp_path: Path,
    name: str,
    params: dict[str, float],
) -> None:
    settings = settings_for("rainfall", estimator={"name": name, "params": params})

    result = train(rainfall_prepared.train_path, settings, tmp_path)

    model = joblib.load(result.model_path)
    assert type(model).__name__ == name
    assert model.get_params()["random_state"] == 0
    assert all(model.get_params()[k] == v for k, v in params.items())
    assert read_json(result.metadata_path)["training_data"]["inputs"] is None


@pytest.mark.unit
def test_training_is_deterministic_on_another_dataset(
    config_file: Path, cancer: pd.DataFrame, tmp_path: Path
) -> None:
    settings = config.load_settings(config_file).models["cancer"]
    source = tmp_path / "cancer.csv"
    cancer.to_csv(source, index=False)
    prepared = preprocess([str(source)], settings, tmp_path / "prepared")

    first = train(prepared.train_path, settings, tmp_path / "one")
    second = train(prepared.train_path, settings, tmp_path / "two")

    evaluation = pd.read_parquet(prepared.eval_path)[list(first.features)]
    one, two = joblib.load(first.model_path), joblib.load(second.model_path)
    np.testing.assert_array_equal(one.predict_proba(evaluation), two.predict_proba(evaluation))
    assert first.metadata_path.read_text() == second.metadata_path.read_text()
    assert len(first.features) == 30


@pytest.mark.unit
def test_unknown_param_names_the_estimator_and_the_param(
    settings_for: Callable[..., ModelSettings], rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    settings = settings_for(
        "rainfall", estimator={"name": "RandomForestClassifier", "params": {"max_iter": 5}}
    )

    with pytest.raises(TrainingError, match=r"RandomForestClassifier has no parameter 'max_iter'"):
        train(rainfall_prepared.train_path, settings, tmp_path / "model")

    assert not (tmp_path / "model").exists()


@pytest.mark.unit
def test_bad_param_value_is_a_training_error_from_sklearn(
    settings_for: Callable[..., ModelSettings], rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    settings = settings_for("rainfall", estimator={"params": {"learning_rate": -1.0}})

    with pytest.raises(TrainingError, match=r"HistGradientBoostingClassifier\.fit fail") as caught:
        train(rainfall_prepared.train_path, settings, tmp_path / "model")

    assert "learning_rate" in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)


def _with_a_hole(prepared: PreprocessResult, directory: Path) -> Path:
    holes = pd.read_parquet(prepared.train_path)
    holes.loc[3, "visibility"] = np.nan
    path = directory / "train.parquet"
    holes.to_parquet(path, index=False)
    return path


@pytest.mark.unit
def test_missing_values_are_refused_for_an_estimator_without_nan_support(
    settings_for: Callable[..., ModelSettings], rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    path = _with_a_hole(rainfall_prepared, tmp_path)
    settings = settings_for("rainfall", estimator={"name": "LogisticRegression"})

    with pytest.raises(TrainingError, match=r"\['visibility'\]: LogisticRegression does not"):
        train(path, settings, tmp_path / "model")


@pytest.mark.unit
def test_missing_values_are_fine_for_hist_gradient_boosting(
    settings_for: Callable[..., ModelSettings], rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    path = _with_a_hole(rainfall_prepared, tmp_path)

    result = train(path, settings_for("rainfall"), tmp_path / "model")

    assert read_json(result.metadata_path)["reference"]["features"]["visibility"]["missing"] == 1
