"""The second real dataset of the tests: the Palmer penguins, as the ``palmerpenguins``
package ships them (``penguins-raw.csv``: 344 penguins observed 2007-2009 near Palmer
Station, Antarctica, by Dr. Kristen Gorman and the Palmer Station LTER; the data is CC0,
the package MIT).

It is what real exports look like, and it is used as shipped: text categories (species,
island, clutch completion), columns that are not features (study name, sample number,
region, stage, individual id, comments), missing measurements, eleven penguins whose sex
is unknown, and an order column of ISO dates. The model predicts ``Sex``; the
configuration below is all it takes (no file is rewritten, only split by study season, as
the data arrived).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["CONFIG", "raw", "seasons"]

CONFIG: dict[str, Any] = {
    "data_prefix": "penguins/",
    "format": "csv",
    "label": "Sex",
    "order_column": "Date Egg",
    "categorical": ["Species", "Island", "Clutch Completion"],
    "exclude_columns": [
        "studyName",
        "Sample Number",
        "Region",
        "Stage",
        "Individual ID",
        "Comments",
    ],
    "validation": {"unlabelled_rows": "drop"},
    "estimator": {"name": "HistGradientBoostingClassifier", "params": {"max_iter": 50}},
    "evaluation": {"fraction": 0.25, "min_rows": 20},
    "gate": {"min_eval_rows": 20, "thresholds": {"roc_auc": {"min": 0.8}}},
}
"""The model's entry under ``models`` in retrain.yaml."""


def raw() -> pd.DataFrame:
    """``penguins-raw.csv`` as the package ships it."""
    source = importlib.resources.files("palmerpenguins") / "data" / "penguins-raw.csv"
    with importlib.resources.as_file(source) as path:
        return pd.read_csv(path)


def seasons(directory: Path) -> list[Path]:
    """The raw file split by study season (PAL0708, PAL0809, PAL0910), one CSV each, rows
    and columns as shipped; oldest first."""
    directory.mkdir(parents=True, exist_ok=True)
    source = importlib.resources.files("palmerpenguins") / "data" / "penguins-raw.csv"
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    by_study: dict[str, list[str]] = {}
    for row in rows:
        by_study.setdefault(row.split(",", 1)[0], []).append(row)
    paths = []
    for study in sorted(by_study):
        path = directory / f"{study}.csv"
        path.write_text(header + "".join(by_study[study]), encoding="utf-8")
        paths.append(path)
    return paths
