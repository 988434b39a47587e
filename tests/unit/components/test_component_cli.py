"""The components' command lines give the same artifacts as the Python functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import joblib
import pandas as pd
import pytest
from typer.testing import CliRunner

from components.evaluate import evaluate
from components.evaluate.cli import app as evaluate_app
from components.preprocess import PreprocessResult
from components.preprocess.cli import app as preprocess_app
from components.train import TrainResult
from components.train.cli import app as train_app

runner = CliRunner()


@pytest.mark.unit
def test_preprocess_cli_writes_what_the_function_writes(
    config_file: Path,
    rainfall_inputs: list[str],
    rainfall_prepared: PreprocessResult,
    tmp_path: Path,
) -> None:
    args = ["-c", str(config_file), "-m", "rainfall", "-o", str(tmp_path)]
    for uri in rainfall_inputs:
        args += ["-i", uri]

    result = runner.invoke(preprocess_app, args)

    assert result.exit_code == 0, result.output
    assert "480 train and 120 eval rows" in result.output
    for name in ("train.parquet", "eval.parquet"):
        expected = pd.read_parquet(rainfall_prepared.train_path.parent / name)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / name), expected)
    expected_summary = rainfall_prepared.summary_path.read_text()
    assert (tmp_path / "summary.json").read_text() == expected_summary


@pytest.mark.unit
def test_preprocess_cli_takes_every_option_from_the_environment(
    config_file: Path, rainfall_inputs: list[str], tmp_path: Path
) -> None:
    env = {
        "RETRAIN_CONFIG": str(config_file),
        "RETRAIN_MODEL": "rainfall",
        "RETRAIN_INPUTS": " ".join(rainfall_inputs),
        "RETRAIN_PREPROCESS_DIR": str(tmp_path),
    }

    result = runner.invoke(preprocess_app, [], env=env)

    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "summary.json").read_text())["input_rows"] == 1200


@pytest.mark.unit
def test_train_cli_writes_what_the_function_writes(
    config_file: Path,
    rainfall_prepared: PreprocessResult,
    rainfall_model: TrainResult,
    tmp_path: Path,
) -> None:
    args = [
        "-c", str(config_file), "-m", "rainfall", "-o", str(tmp_path),
        "--train-data", str(rainfall_prepared.train_path),
        "--summary", str(rainfall_prepared.summary_path),
    ]  # fmt: skip

    result = runner.invoke(train_app, args)

    assert result.exit_code == 0, result.output
    assert (tmp_path / "metadata.json").read_text() == rainfall_model.metadata_path.read_text()
    evaluation = pd.read_parquet(rainfall_prepared.eval_path)[list(rainfall_model.features)]
    ours, theirs = joblib.load(tmp_path / "model.joblib"), joblib.load(rainfall_model.model_path)
    assert (ours.predict_proba(evaluation) == theirs.predict_proba(evaluation)).all()


@pytest.mark.unit
def test_evaluate_cli_writes_what_the_function_returns(
    rainfall_prepared: PreprocessResult, rainfall_model: TrainResult, tmp_path: Path
) -> None:
    model_dir = rainfall_model.model_path.parent
    output = tmp_path / "metrics" / "metrics.json"
    args = [
        "--candidate", str(model_dir), "--champion", str(model_dir),
        "--eval-data", str(rainfall_prepared.eval_path), "-o", str(output),
    ]  # fmt: skip

    result = runner.invoke(evaluate_app, args)

    assert result.exit_code == 0, result.output
    expected = evaluate(model_dir, rainfall_prepared.eval_path, model_dir).to_dict()
    assert json.loads(output.read_text()) == expected


@pytest.mark.unit
def test_bad_data_exits_1_and_names_the_rule(config_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    args = ["-c", str(config_file), "-m", "rainfall", "-i", str(empty), "-o", str(tmp_path)]

    result = runner.invoke(preprocess_app, args)

    assert result.exit_code == 1
    assert f"{empty}: rule empty" in result.stderr


@pytest.mark.unit
def test_unknown_param_exits_1_and_names_estimator_and_param(
    config_for: Callable[..., Path], rainfall_prepared: PreprocessResult, tmp_path: Path
) -> None:
    bad = config_for("rainfall", estimator={"params": {"depth": 3}})
    args = [
        "-c", str(bad), "-m", "rainfall", "-o", str(tmp_path / "model"),
        "--train-data", str(rainfall_prepared.train_path),
    ]  # fmt: skip

    result = runner.invoke(train_app, args)

    assert result.exit_code == 1
    assert "HistGradientBoostingClassifier has no parameter 'depth'" in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("model", "config_name", "expected"),
    [
        ("nope", None, "no model 'nope'; known: cancer, rainfall"),
        ("rainfall", "missing.yaml", "cannot read"),
    ],
)
def test_config_problems_exit_2(
    config_file: Path, tmp_path: Path, model: str, config_name: str | None, expected: str
) -> None:
    config = tmp_path / config_name if config_name else config_file
    args = ["-c", str(config), "-m", model, "-i", "x.csv", "-o", str(tmp_path)]

    result = runner.invoke(preprocess_app, args)

    assert result.exit_code == 2
    assert expected in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("component", "option"),
    [("preprocess", "--input"), ("train", "--train-data"), ("evaluate", "--candidate")],
)
def test_python_m_component_help(component: str, option: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"components.{component}", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )

    assert f"python -m components.{component}" in done.stdout
    assert option in done.stdout
