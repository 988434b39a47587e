"""Fixtures shared by the prediction server's integration tests of issue 15 (the prediction
log and the canary's split): two real rainfall models, trained once per session."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from components.train import train
from tests.integration.test_serving import decisions_subscription, emulator_env, model_name
from tests.unit.test_serving import DATA, SETTINGS

# The real-stack fixtures of test_serving.py, for the other serving tests too.
__all__ = ["decisions_subscription", "emulator_env", "model_name"]


@pytest.fixture(scope="session")
def rainfall_rows() -> pd.DataFrame:
    return pd.read_csv(DATA, nrows=1200).rename(columns={"Unnamed: 0": "day"})


@pytest.fixture(scope="session")
def two_versions(
    tmp_path_factory: pytest.TempPathFactory, rainfall_rows: pd.DataFrame
) -> list[Path]:
    """Model folders: version 1 trained on rows 0-599, version 2 on rows 600-1199."""
    root = tmp_path_factory.mktemp("two-versions")
    dirs = []
    for i, part in enumerate((rainfall_rows.iloc[:600], rainfall_rows.iloc[600:]), start=1):
        part.to_parquet(root / f"train-{i}.parquet")
        spec = SETTINGS.models["rainfall"]
        dirs.append(train(root / f"train-{i}.parquet", spec, root / f"v{i}").model_path.parent)
    return dirs
