"""The model both servers serve: the shipped rainfall estimator (HistGradientBoosting, 200
iterations, 8 features) trained by our train step on the first 3,000 rainfall rows, and
registered as a model's champion in the stack's registry, as the gatekeeper does."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from components.artifacts import MODEL_FILE
from components.train import train
from retrain import blobstore
from retrain.config import ModelSettings
from retrain.gatekeeper.registry import FirestoreRegistry

__all__ = ["DATA", "feature_matrix", "rainfall_rows", "register_champion", "train_model"]

DATA = Path(__file__).resolve().parents[2] / "data" / "rainfall.csv.gz"


def rainfall_rows(rows: int) -> pd.DataFrame:
    """The first ``rows`` of the rainfall stream, its order column named ``day``."""
    return pd.read_csv(DATA, nrows=rows).rename(columns={"Unnamed: 0": "day"})


def feature_matrix(rows: int, features: list[str]) -> npt.NDArray[np.float64]:
    """``rows`` rows of the features, in the model's order, as the requests send them."""
    x: npt.NDArray[np.float64] = rainfall_rows(rows)[features].to_numpy(dtype=np.float64)
    return x


def train_model(spec: ModelSettings, workdir: Path, rows: int = 3000) -> Path:
    """Fit ``spec``'s estimator with our train step; the model folder (model.joblib,
    metadata.json)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "train.parquet"
    rainfall_rows(rows).to_parquet(data)
    result = train(data, spec, workdir / "model")
    assert (result.model_path.parent / MODEL_FILE).exists()
    return result.model_path.parent


def register_champion(registry: FirestoreRegistry, gcs: Any, model: str, folder: Path) -> str:
    """Upload ``folder`` to the registry bucket, register it and make it ``model``'s champion."""
    run_id = f"peers-{uuid.uuid4().hex[:12]}"
    artifact = f"gs://{registry.bucket}/{model}/{run_id}/model"
    blobstore.upload_dir(folder, artifact, gcs)
    version = registry.register(model, {"run_id": run_id, "artifact_uri": artifact,
                                        "metrics": {}})  # fmt: skip
    if not registry.promote(model, version, registry.pointer(model).generation, "bench", "peers"):
        raise RuntimeError(f"could not make {model} version {version} the champion")
    return version
