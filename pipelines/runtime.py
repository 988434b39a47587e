"""What the components import inside their function bodies, at run time in the task."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.compute import thread_limit
from components.runs import RunContext, record_failure
from retrain.config import ModelSettings, Settings, load_settings

__all__ = ["load", "model_settings", "step"]


def load(config_yaml: str) -> Settings:
    """Validate ``config_yaml`` (the text of retrain.yaml, passed as a pipeline parameter)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "retrain.yaml"
        path.write_text(config_yaml, encoding="utf-8")
        return load_settings(path)


def model_settings(config_yaml: str, model: str) -> ModelSettings:
    """The settings of ``model`` in ``config_yaml``, with a clear error for an unknown name."""
    return _model(load(config_yaml), model)


def _model(settings: Settings, model: str) -> ModelSettings:
    try:
        return settings.models[model]
    except KeyError as exc:
        known = ", ".join(sorted(settings.models)) or "none"
        raise ValueError(f"model {model!r} is not in retrain.yaml (models: {known})") from exc


@contextmanager
def step(name: str, config_yaml: str, run: RunContext) -> Iterator[tuple[Settings, ModelSettings]]:
    """Run one pipeline step, its OpenMP and BLAS threads limited to the model's
    ``threads``; if it fails, leave its error for the exit handler to report."""
    settings = load(config_yaml)
    try:
        model = _model(settings, run.model)  # (the config is validated once: ~30 ms)
        with thread_limit(model.threads):
            yield settings, model
    except Exception as exc:
        record_failure(settings, run, name, exc)
        raise
