"""File names inside the components' output directories, and strict JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "EVAL_FILE",
    "METADATA_FILE",
    "MODEL_FILE",
    "SUMMARY_FILE",
    "TRAIN_FILE",
    "read_json",
    "write_json",
]

# preprocess output directory
TRAIN_FILE = "train.parquet"
EVAL_FILE = "eval.parquet"
SUMMARY_FILE = "summary.json"
# model directory: Vertex AI's layout for scikit-learn models (artifact_uri/model.joblib);
# our serving container (serving/vertex_container.py) loads it with the same scikit-learn
MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON; NaN or infinity is an error, not invalid JSON."""
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(path.read_text(encoding="utf-8"))
