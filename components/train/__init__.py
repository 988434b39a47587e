"""Train: fit the configured estimator and write a servable model directory."""

from components.train.training import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "train"]
