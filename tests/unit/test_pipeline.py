"""The compiled pipeline and component YAML are current; custom components are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.byo import ComponentMismatch, ContainerComponentLocally, load_custom
from pipelines.compile import (
    COMPONENT_FILES,
    EXAMPLE_PIPELINE_FILE,
    PIPELINE_FILE,
    ROOT,
    app,
    compile_all,
)
from pipelines.image import COMPONENT_IMAGE
from retrain.config import load_settings

pytestmark = pytest.mark.unit

REGENERATE = "python -m pipelines.compile"
GOLDEN = [PIPELINE_FILE, EXAMPLE_PIPELINE_FILE, *(path for path, _ in COMPONENT_FILES.values())]


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
        expected = {image}
        if relative == EXAMPLE_PIPELINE_FILE:  # a container component keeps its own image
            expected.add("retrain-components:latest")
        assert _images(tmp_path / relative) == expected, relative
        assert f"wrote {tmp_path / relative}" in result.output


def test_help_names_the_options() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "--image" in result.output
    assert "--out-dir" in result.output


# --- bring your own component ---------------------------------------------------------

EXAMPLE = ROOT / "components" / "examples" / "train-container.yaml"


def _component(tmp_path: Path, inputs: str, outputs: str) -> Path:
    path = tmp_path / "component.yaml"
    path.write_text(
        f"""name: custom
inputs:
{inputs}
outputs:
{outputs}
implementation:
  container:
    image: example.com/trainer:1
    command: [train]
""",
        encoding="utf-8",
    )
    return path


def test_example_container_component_fits_train_but_not_a_local_run() -> None:
    assert callable(load_custom("train", str(EXAMPLE), local_run=False))
    with pytest.raises(ContainerComponentLocally, match="support Python components only"):
        load_custom("train", str(EXAMPLE), local_run=True)


@pytest.mark.parametrize(
    ("inputs", "outputs", "problem"),
    [
        (
            "- {name: train_data, type: Dataset}\n- {name: summary, type: Artifact}",
            "- {name: weights, type: Model}",
            "output 'model_artifact' (system.Model@0.0.1) is missing",
        ),
        (
            "- {name: train_data, type: Model}\n- {name: summary, type: Artifact}",
            "- {name: model_artifact, type: Model}",
            "input 'train_data' has type system.Model@0.0.1, the step gives system.Dataset@0.0.1",
        ),
        (
            "- {name: train_data, type: Dataset}\n- {name: summary, type: Artifact}\n"
            "- {name: epochs, type: Integer}",
            "- {name: model_artifact, type: Model}",
            "input 'epochs' is not one of the step's inputs",
        ),
        (
            "- {name: summary, type: Artifact}",
            "- {name: model_artifact, type: Model}",
            "input artifact 'train_data' (system.Dataset@0.0.1) is not taken",
        ),
    ],
)
def test_mismatched_component_is_refused_naming_the_port(
    tmp_path: Path, inputs: str, outputs: str, problem: str
) -> None:
    path = _component(tmp_path, inputs, outputs)
    with pytest.raises(ComponentMismatch) as error:
        load_custom("train", str(path), local_run=False)
    assert f"{path} cannot replace the train step" in str(error.value)
    assert problem in str(error.value)


def test_unloadable_component_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nimplementation: 5\n", encoding="utf-8")
    with pytest.raises(ComponentMismatch, match=r"broken\.yaml: cannot load a component"):
        load_custom("preprocess", str(path), local_run=False)


def test_config_with_custom_train_compiles_a_pipeline_of_its_own(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    config["models"]["rainfall"]["components"] = {"train": str(EXAMPLE)}
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")

    written = compile_all(tmp_path / "out", settings=load_settings(path))

    custom = tmp_path / "out" / "pipelines" / "retrain_pipeline.rainfall.yaml"
    assert custom in written
    spec = yaml.safe_load(custom.read_text(encoding="utf-8"))
    assert "exec-train-in-a-plain-container" in spec["deploymentSpec"]["executors"]
    assert "exec-train-model" not in spec["deploymentSpec"]["executors"]
