"""components.preprocess: window, split and summary; one test per validation rule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.artifacts import read_json
from components.preprocess import PreprocessResult, Rule, ValidationError, preprocess
from retrain.config import ModelSettings, load_settings

FEATURES = [
    "temperature",
    "dew point",
    "sea-level pressure",
    "visibility",
    "average wind speed",
    "max sustained wind-speed",
    "minimum temperature",
    "maximum temperature",
]


def write_csv(frame: pd.DataFrame, path: Path) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def assert_names(error: ValidationError, obj: str, columns: list[str], rule: Rule) -> None:
    message = str(error)
    assert obj in message
    for column in columns:
        assert repr(column) in message
    assert f"rule {rule}" in message
    assert error.rule is rule


# -- window, split and summary ------------------------------------------------------------


@pytest.mark.unit
def test_window_is_latest_rows_and_eval_is_the_newest_part(
    rainfall_prepared: PreprocessResult, rainfall: pd.DataFrame
) -> None:
    train = pd.read_parquet(rainfall_prepared.train_path)
    evaluation = pd.read_parquet(rainfall_prepared.eval_path)

    assert train["day"].tolist() == list(range(600, 1080))
    assert evaluation["day"].tolist() == list(range(1080, 1200))
    assert list(train.columns) == ["day", *FEATURES, "rain"]
    assert all(train[c].dtype == np.float64 for c in FEATURES)
    expected = rainfall.iloc[1080:1200].reset_index(drop=True)
    pd.testing.assert_frame_equal(evaluation, expected)
    assert (rainfall_prepared.train_rows, rainfall_prepared.eval_rows) == (480, 120)


@pytest.mark.unit
def test_summary_names_inputs_rows_window_and_features(
    rainfall_prepared: PreprocessResult, rainfall_inputs: list[str]
) -> None:
    summary = read_json(rainfall_prepared.summary_path)

    assert summary["inputs"] == [
        {"uri": rainfall_inputs[0], "rows": 400},
        {"uri": rainfall_inputs[1], "rows": 800},
    ]
    assert summary["input_rows"] == 1200
    assert summary["features"] == FEATURES
    assert summary["window"] == {"requested_rows": 600, "rows": 600, "first": 600, "last": 1199}
    assert summary["train"] == {"file": "train.parquet", "rows": 480, "first": 600, "last": 1079}
    assert summary["eval"] == {"file": "eval.parquet", "rows": 120, "first": 1080, "last": 1199}


@pytest.mark.unit
def test_null_window_keeps_all_rows(
    settings_for: Callable[..., ModelSettings], rainfall_inputs: list[str], tmp_path: Path
) -> None:
    settings = settings_for("rainfall", training_window={"rows": None})

    result = preprocess(rainfall_inputs, settings, tmp_path / "out")

    assert (result.train_rows, result.eval_rows) == (960, 240)
    assert pd.read_parquet(result.eval_path)["day"].min() == 960


@pytest.mark.unit
def test_shuffled_parquet_objects_are_sorted_by_order(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    settings = settings_for("rainfall", format="parquet")
    shuffled = rainfall.sample(frac=1.0, random_state=3)
    uris = []
    for i in range(3):
        path = tmp_path / f"part-{i}.parquet"
        shuffled.iloc[i * 400 : (i + 1) * 400].to_parquet(path, index=False)
        uris.append(str(path))

    result = preprocess(uris, settings, tmp_path / "out")

    assert pd.read_parquet(result.train_path)["day"].tolist() == list(range(600, 1080))
    assert pd.read_parquet(result.eval_path)["day"].tolist() == list(range(1080, 1200))


@pytest.mark.unit
def test_explicit_features_set_the_column_order(
    settings_for: Callable[..., ModelSettings], rainfall_inputs: list[str], tmp_path: Path
) -> None:
    features = list(reversed(FEATURES))
    settings = settings_for("rainfall", features=features)

    result = preprocess(rainfall_inputs, settings, tmp_path / "out")

    assert result.features == tuple(features)
    assert list(pd.read_parquet(result.train_path).columns) == ["day", *features, "rain"]


@pytest.mark.unit
def test_another_dataset_works_by_configuration_alone(
    config_file: Path, cancer: pd.DataFrame, tmp_path: Path
) -> None:
    settings = load_settings(config_file).models["cancer"]
    uri = write_csv(cancer, tmp_path / "cancer.csv")

    result = preprocess([uri], settings, tmp_path / "out")

    evaluation = pd.read_parquet(result.eval_path)
    assert len(result.features) == 30
    assert (result.train_rows, result.eval_rows) == (427, 142)
    assert evaluation["seq"].tolist() == list(range(427, 569))


# -- one test per validation rule ----------------------------------------------------------


@pytest.mark.unit
def test_rule_unreadable_missing_object(
    settings_for: Callable[..., ModelSettings], rainfall_inputs: list[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "gone.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([missing], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, missing, [], Rule.UNREADABLE)
    assert caught.value.__cause__ is not None


@pytest.mark.unit
def test_rule_unreadable_bad_parquet(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    uri = write_csv(rainfall, tmp_path / "data.parquet")

    with pytest.raises(ValidationError) as caught:
        preprocess([uri], settings_for("rainfall", format="parquet"), tmp_path / "out")

    assert_names(caught.value, uri, [], Rule.UNREADABLE)
    assert "parquet" in str(caught.value)


@pytest.mark.unit
@pytest.mark.parametrize("content", ["", "day,temperature,rain\n"])
def test_rule_empty(
    settings_for: Callable[..., ModelSettings], tmp_path: Path, content: str
) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(ValidationError) as caught:
        preprocess([str(path)], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, str(path), [], Rule.EMPTY)


@pytest.mark.unit
def test_rule_missing_column(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    bad = write_csv(rainfall.drop(columns=["visibility"]), tmp_path / "b.csv")
    settings = settings_for("rainfall", features=FEATURES)

    with pytest.raises(ValidationError) as caught:
        preprocess([bad], settings, tmp_path / "out")

    assert_names(caught.value, bad, ["visibility"], Rule.MISSING_COLUMN)


@pytest.mark.unit
def test_rule_missing_column_hints_at_the_unnamed_index(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    raw = write_csv(rainfall.rename(columns={"day": ""}), tmp_path / "raw.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([raw], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, raw, ["day"], Rule.MISSING_COLUMN)
    assert "empty header" in str(caught.value)


@pytest.mark.unit
def test_rule_extra_column_with_explicit_features(
    settings_for: Callable[..., ModelSettings], rainfall_inputs: list[str], tmp_path: Path
) -> None:
    settings = settings_for("rainfall", features=["temperature", "dew point"])

    with pytest.raises(ValidationError) as caught:
        preprocess(rainfall_inputs, settings, tmp_path / "out")

    assert_names(caught.value, rainfall_inputs[0], FEATURES[2:], Rule.EXTRA_COLUMN)


@pytest.mark.unit
def test_a_feature_not_in_every_object_is_left_out_and_named(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    old = write_csv(rainfall.iloc[:600].assign(humidity=0.5), tmp_path / "a.csv")
    new = write_csv(rainfall.iloc[600:].drop(columns=["visibility"]), tmp_path / "b.csv")

    result = preprocess([old, new], settings_for("rainfall"), tmp_path / "out")

    summary = read_json(result.summary_path)
    assert "visibility" not in result.features
    assert "humidity" not in result.features
    assert summary["dropped_features"] == ["humidity", "visibility"]
    assert summary["input_rows"] == len(rainfall)


@pytest.mark.unit
def test_a_bad_object_among_good_ones_is_left_out_and_named(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    good = write_csv(rainfall.iloc[:900], tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("day,temperature,rain\n", encoding="utf-8")
    bad = str(tmp_path / "b.csv")

    result = preprocess([good, bad], settings_for("rainfall"), tmp_path / "out")

    summary = read_json(result.summary_path)
    assert [i["uri"] for i in summary["inputs"]] == [good]
    assert [(s["uri"], s["rule"]) for s in summary["skipped"]] == [(bad, "empty")]


@pytest.mark.unit
def test_rule_non_numeric_feature(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    bad = rainfall.assign(visibility=np.where(rainfall["visibility"] > 0, "high", "low"))
    uri = write_csv(bad, tmp_path / "words.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([uri], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, uri, ["visibility"], Rule.NON_NUMERIC)


@pytest.mark.unit
def test_rule_non_numeric_order_column(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    uri = write_csv(rainfall.assign(day="d" + rainfall["day"].astype(str)), tmp_path / "d.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([uri], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, uri, ["day"], Rule.NON_NUMERIC)


@pytest.mark.unit
def test_rule_all_null_names_every_object(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    blank = rainfall.assign(visibility=np.nan)
    uris = [
        write_csv(blank.iloc[:600], tmp_path / "a.csv"),
        write_csv(blank.iloc[600:], tmp_path / "b.csv"),
    ]

    with pytest.raises(ValidationError) as caught:
        preprocess(uris, settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, uris[0], ["visibility"], Rule.ALL_NULL)
    assert uris[1] in str(caught.value)
    assert "every input object breaks a rule" in str(caught.value)


@pytest.mark.unit
def test_rule_null_values_in_the_label(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    bad = rainfall.astype({"rain": "float64"})
    bad.loc[5, "rain"] = np.nan
    uri = write_csv(bad, tmp_path / "holes.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([uri], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, uri, ["rain"], Rule.NULL_VALUES)


@pytest.mark.unit
def test_rule_label_not_binary_in_one_object(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    three = rainfall.iloc[600:].copy()
    three.loc[three.index[:10], "rain"] = 2
    bad = write_csv(three, tmp_path / "b.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([bad], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, bad, ["rain"], Rule.LABEL_NOT_BINARY)
    assert "found 3: 0, 1, 2" in str(caught.value)


@pytest.mark.unit
def test_rule_label_not_binary_over_all_objects(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    uri = write_csv(rainfall.assign(rain=0), tmp_path / "dry.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([uri], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, uri, ["rain"], Rule.LABEL_NOT_BINARY)
    assert "found 1: 0" in str(caught.value)


@pytest.mark.unit
def test_rule_too_few_rows(
    settings_for: Callable[..., ModelSettings], rainfall_inputs: list[str], tmp_path: Path
) -> None:
    settings = settings_for("rainfall", evaluation={"fraction": 0.2, "min_rows": 200})

    with pytest.raises(ValidationError) as caught:
        preprocess(rainfall_inputs, settings, tmp_path / "out")

    assert_names(caught.value, rainfall_inputs[0], ["day"], Rule.TOO_FEW_ROWS)
    assert "480 training and 120 evaluation rows" in str(caught.value)
    assert "evaluation.min_rows = 200" in str(caught.value)


@pytest.mark.unit
def test_rule_single_class_in_a_split(
    settings_for: Callable[..., ModelSettings], rainfall: pd.DataFrame, tmp_path: Path
) -> None:
    dry_end = rainfall.copy()
    dry_end.loc[dry_end["day"] >= 1080, "rain"] = 0
    uri = write_csv(dry_end, tmp_path / "dry-end.csv")

    with pytest.raises(ValidationError) as caught:
        preprocess([uri], settings_for("rainfall"), tmp_path / "out")

    assert_names(caught.value, uri, ["rain"], Rule.SINGLE_CLASS)
    assert "evaluation split" in str(caught.value)


@pytest.mark.unit
def test_no_output_is_written_when_validation_fails(
    settings_for: Callable[..., ModelSettings], tmp_path: Path
) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")

    with pytest.raises(ValidationError):
        preprocess([str(path)], settings_for("rainfall"), tmp_path / "out")

    assert not (tmp_path / "out").exists()
