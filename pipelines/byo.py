"""Bring your own component: replace our preprocess or train step with any ``component.yaml``.

"ML container + component.yaml = component". The replacement must fit where ours sits:
each of its inputs must be one of our step's inputs with the same type (it may take
fewer parameters, but must take our artifacts), and it must produce every output of
ours with the same type. The check runs before compiling, and its error names each
mismatch.
"""

from __future__ import annotations

from typing import Any

from retrain.config import Settings

__all__ = ["ComponentMismatch", "ContainerComponentLocally", "load_custom", "pipeline_for"]


class ComponentMismatch(ValueError):
    """A custom component whose interface does not fit the step it replaces."""


class ContainerComponentLocally(ValueError):
    """kfp.local runs Python components only; a container component needs Vertex or KFP."""


def _ours(step: str) -> Any:
    from components.preprocess.component import preprocess_op  # noqa: PLC0415
    from components.train.component import train_op  # noqa: PLC0415

    return {"preprocess": preprocess_op, "train": train_op}[step]


def _load(ref: str) -> Any:
    from kfp import components  # noqa: PLC0415

    try:
        if "://" in ref:
            return components.load_component_from_url(ref)
        return components.load_component_from_file(ref)
    except Exception as exc:
        raise ComponentMismatch(f"{ref}: cannot load a component from it: {exc}") from exc


def is_python_component(component: Any) -> bool:
    """True for lightweight Python components, which kfp.local's SubprocessRunner can run."""
    container = component.component_spec.implementation.container
    command = " ".join(str(part) for part in (container.command or []) if isinstance(part, str))
    return "kfp.dsl.executor_main" in command


def check_fits(step: str, ref: str, component: Any) -> None:
    ours = _ours(step).component_spec
    theirs = component.component_spec
    problems = []
    for name, spec in (theirs.inputs or {}).items():
        if name not in ours.inputs:
            known = ", ".join(sorted(ours.inputs))
            problems.append(f"input {name!r} is not one of the step's inputs ({known})")
        elif spec.type != ours.inputs[name].type:
            problems.append(
                f"input {name!r} has type {spec.type}, the step gives {ours.inputs[name].type}"
            )
    for name, spec in ours.inputs.items():
        artifact = spec.type.startswith("system.")
        if artifact and name not in (theirs.inputs or {}):
            problems.append(f"input artifact {name!r} ({spec.type}) is not taken")
    for name, spec in ours.outputs.items():
        given = (theirs.outputs or {}).get(name)
        if given is None:
            problems.append(f"output {name!r} ({spec.type}) is missing")
        elif given.type != spec.type:
            problems.append(f"output {name!r} has type {given.type}, the step needs {spec.type}")
    if problems:
        raise ComponentMismatch(f"{ref} cannot replace the {step} step: " + "; ".join(problems))


def load_custom(step: str, ref: str, *, local_run: bool) -> Any:
    """Load ``ref``, check it fits ``step``, and wrap it to take only the inputs it declares."""
    component = _load(ref)
    check_fits(step, ref, component)
    if local_run and not is_python_component(component):
        raise ContainerComponentLocally(
            f"the {step} step is the container component {ref}; local runs (kfp.local's "
            "SubprocessRunner) support Python components only. Run it on Vertex AI Pipelines "
            "or Kubeflow Pipelines (backend: vertex or kfp in retrain.yaml), or compile it "
            "with `retrain compile`."
        )
    accepted = set(component.component_spec.inputs or {})

    def only_declared(**kwargs: Any) -> Any:
        return component(**{k: v for k, v in kwargs.items() if k in accepted})

    return only_declared


def pipeline_for(settings: Settings, model: str, image: str, *, local_run: bool = False) -> Any:
    """The pipeline for ``model``: ours, with its custom steps if retrain.yaml names any."""
    from pipelines.retrain_pipeline import build_pipeline  # noqa: PLC0415

    custom = {
        step: load_custom(step, ref, local_run=local_run)
        for step, ref in settings.models[model].components.items().items()
    }
    return build_pipeline(
        image, preprocess_op=custom.get("preprocess"), train_op=custom.get("train")
    )
