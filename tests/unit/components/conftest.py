"""Shared data and settings for the component tests: real files in temp directories."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from sklearn.datasets import load_breast_cancer

from components.preprocess import PreprocessResult, preprocess
from components.train import TrainResult, train
from retrain.config import ModelSettings, load_settings

DATA = Path(__file__).resolve().parents[3] / "data" / "rainfall.csv.gz"

# Small windows and estimators keep the whole module fast; the shapes match retrain.yaml.
BASE_CONFIG: dict[str, Any] = {
    "project": "retrain-test",
    "buckets": {"data": "test-data", "artifacts": "test-artifacts"},
    "models": {
        "rainfall": {
            "data_prefix": "rainfall/",
            "format": "csv",
            "label": "rain",
            "order_column": "day",
            "training_window": {"rows": 600},
            "estimator": {
                "name": "HistGradientBoostingClassifier",
                "params": {"max_iter": 20},
            },
            "evaluation": {"fraction": 0.2, "min_rows": 50},
        },
        "cancer": {
            "data_prefix": "cancer/",
            "format": "csv",
            "label": "target",
            "order_column": "seq",
            "estimator": {"name": "RandomForestClassifier", "params": {"n_estimators": 20}},
            "evaluation": {"fraction": 0.25, "min_rows": 40},
        },
    },
}


def write_config(directory: Path, models: dict[str, dict[str, Any]] | None = None) -> Path:
    """A retrain.yaml in ``directory``; ``models`` entries update the base models key by key."""
    config = copy.deepcopy(BASE_CONFIG)
    for name, changes in (models or {}).items():
        config["models"][name].update(changes)
    path = directory / "retrain.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def rainfall() -> pd.DataFrame:
    """The first 1,200 rows of rainfall.csv.gz, with the unnamed index named ``day``."""
    frame = pd.read_csv(DATA, nrows=1200)
    return frame.rename(columns={"Unnamed: 0": "day"})


@pytest.fixture(scope="session")
def cancer() -> pd.DataFrame:
    """sklearn's breast-cancer data with a made-up, shuffled order column ``seq``."""
    frame = load_breast_cancer(as_frame=True).frame
    frame.insert(0, "seq", frame.sample(frac=1.0, random_state=7).index.to_numpy())
    return frame


@pytest.fixture(scope="session")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("config"))


@pytest.fixture
def config_for(tmp_path: Path) -> Callable[..., Path]:
    """``config_for("rainfall", features=[...])``: a retrain.yaml with that model changed."""

    def make(model: str, **changes: Any) -> Path:
        return write_config(tmp_path, {model: changes})

    return make


@pytest.fixture
def settings_for(config_for: Callable[..., Path]) -> Callable[..., ModelSettings]:
    """``settings_for("rainfall", features=[...])``: model settings through a real yaml file."""

    def make(model: str, **changes: Any) -> ModelSettings:
        return load_settings(config_for(model, **changes)).models[model]

    return make


@pytest.fixture(scope="session")
def rainfall_inputs(tmp_path_factory: pytest.TempPathFactory, rainfall: pd.DataFrame) -> list[str]:
    """Two objects, newest first: rows 800-1199 (gzipped) and rows 0-799."""
    directory = tmp_path_factory.mktemp("inputs")
    new, old = directory / "b.csv.gz", directory / "a.csv"
    rainfall.iloc[800:].to_csv(new, index=False)
    rainfall.iloc[:800].to_csv(old, index=False)
    return [str(new), str(old)]


@pytest.fixture(scope="session")
def rainfall_prepared(
    tmp_path_factory: pytest.TempPathFactory, config_file: Path, rainfall_inputs: list[str]
) -> PreprocessResult:
    settings = load_settings(config_file).models["rainfall"]
    return preprocess(rainfall_inputs, settings, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def rainfall_model(
    tmp_path_factory: pytest.TempPathFactory, config_file: Path, rainfall_prepared: PreprocessResult
) -> TrainResult:
    settings = load_settings(config_file).models["rainfall"]
    return train(
        rainfall_prepared.train_path,
        settings,
        tmp_path_factory.mktemp("model"),
        summary_path=rainfall_prepared.summary_path,
    )
