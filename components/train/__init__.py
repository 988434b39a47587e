"""Train: fit the configured estimator and write a servable model directory.

The names below are imported on first use (PEP 562): importing this package, or its KFP
wrapper ``component``, to build a pipeline does not pull in scikit-learn and pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.train.training import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "train"]

_WHERE = {
    "TrainResult": "components.train.training",
    "TrainingError": "components.train.training",
    "train": "components.train.training",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
