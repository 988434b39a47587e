"""Worker processes of the prediction server: slots, and what `retrain up` passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retrain.config import ConfigError, load_settings
from retrain.localstack import Stack
from serving.__main__ import claim_slot
from tests.conftest import write_config

pytestmark = pytest.mark.unit


def test_each_process_claims_the_lowest_free_slot(tmp_path: Path) -> None:
    folder = tmp_path / ".workers"
    first, first_lock = claim_slot(folder)
    second, second_lock = claim_slot(folder)  # another open file: the lock is not shared
    assert (first, second) == (0, 1)
    first_lock.close()  # the worker holding slot 0 ends; its replacement takes slot 0
    again, again_lock = claim_slot(folder)
    third, third_lock = claim_slot(folder)
    assert (again, third) == (0, 2)
    for handle in (second_lock, again_lock, third_lock):
        handle.close()


def test_retrain_up_passes_the_serving_workers(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["local"]["serving_workers"] = 3
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    (serving,) = [p for p in Stack(load_settings(path), path).parts() if p.name == "serving"]
    assert serving.argv[-2:] == ("--workers", "3")
    (tmp_path / "d").mkdir()
    other = write_config(tmp_path / "d")
    (default,) = [p for p in Stack(load_settings(other), other).parts() if p.name == "serving"]
    assert default.argv[-2:] == ("--workers", "1")
    raw["local"]["serving_workers"] = 0
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError, match="serving_workers"):
        load_settings(path)
