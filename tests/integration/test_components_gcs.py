"""Components read gs:// objects through google-cloud-storage, on fake-gcs-server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from components.dataio import DataReadError, read_table
from components.preprocess import preprocess
from retrain.config import load_settings
from retrain.localstack import Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emulated_storage(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment a component gets from the launcher: the client finds the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", stack.gcs_url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", stack.settings.project)


@pytest.mark.usefixtures("emulated_storage")
def test_preprocess_reads_gs_objects_on_the_emulator(bucket: Any, tmp_path: Path) -> None:
    rows = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=4000).rename(
        columns={"Unnamed: 0": "day"}
    )
    uris = []
    for start in (0, 2000):
        name = f"rainfall/rows-{start}.csv"
        bucket.blob(name).upload_from_string(
            rows.iloc[start : start + 2000].to_csv(index=False), content_type="text/csv"
        )
        uris.append(f"gs://{bucket.name}/{name}")
    settings = load_settings(ROOT / "retrain.yaml").models["rainfall"]

    result = preprocess(uris, settings, tmp_path)

    assert (result.train_rows, result.eval_rows) == (2400, 600)  # latest 3,000, newest 20 %
    evaluation = pd.read_parquet(result.eval_path)
    assert evaluation["day"].min() == 3400
    assert evaluation["day"].max() == 3999
    summary = json.loads(result.summary_path.read_text(encoding="utf-8"))
    assert json.dumps(summary).count(uris[0]) >= 1


@pytest.mark.usefixtures("emulated_storage")
def test_missing_gs_object_is_named(bucket: Any) -> None:
    uri = f"gs://{bucket.name}/rainfall/absent.csv"
    with pytest.raises(DataReadError, match=r"rainfall/absent\.csv: no such object"):
        read_table(uri, "csv")
