"""Train: fit the configured estimator and write a servable model directory.

The names below are imported on first use (components.lazy): building a pipeline does not
pull in scikit-learn and pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.lazy import exports

if TYPE_CHECKING:
    from components.train.training import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "train"]

__getattr__ = exports(
    __name__,
    {
        "TrainResult": "components.train.training",
        "TrainingError": "components.train.training",
        "train": "components.train.training",
    },
)
