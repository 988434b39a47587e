"""The compiled pipeline and component YAML are current, and the pipeline runs locally."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kfp import local
from typer.testing import CliRunner

from pipelines.compile import COMPONENT_FILES, PIPELINE_FILE, ROOT, app, compile_all
from pipelines.image import COMPONENT_IMAGE
from pipelines.retrain_pipeline import retrain_pipeline

pytestmark = pytest.mark.unit

REGENERATE = "python -m pipelines.compile"
GOLDEN = [PIPELINE_FILE, *(path for path, _ in COMPONENT_FILES.values())]
DATA = ROOT / "data" / "rainfall.csv.gz"


def _images(path: Path) -> set[str]:
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    executors = spec["deploymentSpec"]["executors"]
    return {executor["container"]["image"] for executor in executors.values()}


def test_compile_all_writes_every_file(tmp_path: Path) -> None:
    written = compile_all(tmp_path)
    assert sorted(written) == sorted(tmp_path / path for path in GOLDEN)


@pytest.mark.parametrize("relative", GOLDEN, ids=str)
def test_checked_in_yaml_is_current(tmp_path: Path, relative: Path) -> None:
    compile_all(tmp_path)
    golden = ROOT / relative
    assert golden.exists(), f"{relative} is missing; regenerate it with `{REGENERATE}`"
    fresh = (tmp_path / relative).read_text(encoding="utf-8")
    assert fresh == golden.read_text(encoding="utf-8"), (
        f"{relative} is stale: the pipeline or a component changed; "
        f"regenerate the YAML with `{REGENERATE}` and check it in"
    )


def test_golden_yaml_uses_the_default_image() -> None:
    for relative in GOLDEN:
        assert _images(ROOT / relative) == {COMPONENT_IMAGE}, relative


def test_image_option_sets_base_image(tmp_path: Path) -> None:
    image = "us-docker.pkg.dev/retrain-test/retrain/components:abc123"
    result = CliRunner().invoke(app, ["--image", image, "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for relative in GOLDEN:
        assert _images(tmp_path / relative) == {image}, relative
        assert f"wrote {tmp_path / relative}" in result.output


def test_help_names_the_options() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "--image" in result.output
    assert "--out-dir" in result.output


@pytest.mark.integration
# SubprocessRunner warns for any base image without "python" in its name. Here the tasks
# run in this venv, where the project is installed, so the custom image does not matter.
@pytest.mark.filterwarnings(
    "ignore:You may be attemping to run a task that uses custom:RuntimeWarning:kfp.local.*"
)
def test_pipeline_runs_locally(tmp_path: Path) -> None:
    csv = tmp_path / "rainfall.csv"
    frame = pd.read_csv(DATA, nrows=3000).rename(columns={"Unnamed: 0": "day"})
    frame.to_csv(csv, index=False)
    config = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    config["models"]["rainfall"]["estimator"]["params"]["max_iter"] = 20
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    task = retrain_pipeline(
        model="rainfall",
        data_uris=[str(csv)],
        request_id="test-request",
        reason="test",
        config_yaml=yaml.safe_dump(config, sort_keys=False),
    )

    report = json.loads(Path(task.output.path).read_text(encoding="utf-8"))
    assert report["champion"] is None
    assert report["candidate"]["rows"] == 600
    assert report["candidate"]["roc_auc"] > 0.6
    # Output[Metrics] writes no file: the logged values are in the task's executor output.
    outputs = list((tmp_path / "root").rglob("evaluate-model/executor_output.json"))
    assert len(outputs) == 1
    metrics = json.loads(outputs[0].read_text(encoding="utf-8"))["artifacts"]["metrics"]
    logged = metrics["artifacts"][0]["metadata"]
    assert set(logged) == {"roc_auc", "accuracy", "log_loss", "precision", "recall", "rows"}
    assert logged["roc_auc"] == pytest.approx(report["candidate"]["roc_auc"])
