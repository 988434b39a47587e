"""Compile the pipeline and each component to YAML: ``python -m pipelines.compile``.

The YAML files are checked in; ``tests/unit/test_pipeline.py`` fails when they are stale.
"""

from pathlib import Path
from typing import Annotated, Any

import typer
from kfp import compiler

from components.evaluate.component import evaluate_model
from components.preprocess.component import preprocess_data
from components.train.component import train_model
from pipelines.byo import load_custom, pipeline_for
from pipelines.image import COMPONENT_IMAGE, build_component
from pipelines.retrain_pipeline import build_pipeline
from retrain.config import Settings

__all__ = [
    "COMPONENT_FILES",
    "EXAMPLE_PIPELINE_FILE",
    "PIPELINE_FILE",
    "ROOT",
    "app",
    "compile_all",
]

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILE = Path("pipelines/retrain_pipeline.yaml")
# Bring your own component: our pipeline with the example plain-container train step.
EXAMPLE_COMPONENT = Path("components/examples/train-container.yaml")
EXAMPLE_PIPELINE_FILE = Path("pipelines/examples/retrain_pipeline.train-container.yaml")
COMPONENT_FILES: dict[str, tuple[Path, Any]] = {
    "preprocess": (Path("components/preprocess/component.yaml"), preprocess_data),
    "train": (Path("components/train/component.yaml"), train_model),
    "evaluate": (Path("components/evaluate/component.yaml"), evaluate_model),
}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def compile_all(
    out_dir: Path = ROOT, image: str = COMPONENT_IMAGE, settings: Settings | None = None
) -> list[Path]:
    """Write the pipeline and component YAML under ``out_dir`` (the repository layout).

    A model whose ``components`` in retrain.yaml bring their own steps gets a pipeline of
    its own, ``pipelines/retrain_pipeline.<model>.yaml``, after its components are checked.
    """
    written: list[Path] = []
    targets = [(PIPELINE_FILE, build_pipeline(image))]
    targets += [(path, build_component(func, image)) for path, func in COMPONENT_FILES.values()]
    example = load_custom("train", str(ROOT / EXAMPLE_COMPONENT), local_run=False)
    targets.append((EXAMPLE_PIPELINE_FILE, build_pipeline(image, train_op=example)))
    for model, spec in (settings.models if settings else {}).items():
        if spec.components.items():
            assert settings is not None  # noqa: S101 (for mypy: the loop is empty otherwise)
            path = PIPELINE_FILE.with_name(f"retrain_pipeline.{model}.yaml")
            targets.append((path, pipeline_for(settings, model, image)))
    for relative, func in targets:
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(func, package_path=str(path))
        written.append(path)
    return written


@app.command()
def main(
    image: Annotated[
        str,
        typer.Option("--image", help="Container image the components run in (base_image)."),
    ] = COMPONENT_IMAGE,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out-dir",
            help="Root to write under: pipelines/retrain_pipeline.yaml and "
            "components/<name>/component.yaml. Default: this repository.",
            show_default=False,
        ),
    ] = ROOT,
) -> None:
    """Compile the retraining pipeline and its components to KFP YAML."""
    for path in compile_all(out_dir, image):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app(prog_name="python -m pipelines.compile")
