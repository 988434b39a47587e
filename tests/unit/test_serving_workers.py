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


def test_a_worker_never_replaces_a_cached_folder_another_worker_loads_from(
    tmp_path: Path,
) -> None:
    """Two workers, one cache: the second download finishes after the first worker's folder
    was renamed in; the first folder stays (its files are the ones loaded), the second goes.
    (Replacing it made the first worker's load fail: "model.joblib is missing".)"""
    from components.artifacts import METADATA_FILE, MODEL_FILE  # noqa: PLC0415
    from retrain.gatekeeper.registry import ModelVersion  # noqa: PLC0415
    from serving.models import ModelStore  # noqa: PLC0415

    cache = tmp_path / "cache"
    version = ModelVersion("m", "2", "gs://registry/m/run-2/model")
    first: dict[str, Path] = {}

    def write(local: Path, text: str) -> None:
        (local / MODEL_FILE).write_text(text, encoding="utf-8")
        (local / METADATA_FILE).write_text("{}", encoding="utf-8")

    def slow_download(uri: str, local: Path) -> object:
        del uri
        first["folder"] = fast._local_folder(version)  # the other worker wins meanwhile
        write(local, "second")
        return local

    fast = ModelStore(["m"], None, lambda _, local: write(local, "first"), cache)  # type: ignore[arg-type]
    slow = ModelStore(["m"], None, slow_download, cache)  # type: ignore[arg-type]

    folder = slow._local_folder(version)

    assert folder == first["folder"]
    assert (folder / MODEL_FILE).read_text(encoding="utf-8") == "first"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial left
