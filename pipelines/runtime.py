"""Helpers the components import inside their function bodies, at run time in the task."""

import tempfile
from pathlib import Path

from retrain.config import ModelSettings, load_settings

__all__ = ["model_settings"]


def model_settings(config_yaml: str, model: str) -> ModelSettings:
    """Validate ``config_yaml`` (the text of retrain.yaml) and return the settings of ``model``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "retrain.yaml"
        path.write_text(config_yaml, encoding="utf-8")
        settings = load_settings(path)
    try:
        return settings.models[model]
    except KeyError as exc:
        known = ", ".join(sorted(settings.models)) or "none"
        raise ValueError(f"model {model!r} is not in retrain.yaml (models: {known})") from exc
