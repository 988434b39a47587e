"""No import circles among our modules, counting imports inside functions too.

A circle hidden in a lazy import still couples two modules both ways (the issue found
``pipelines.launchers`` -> ``pipelines.local_run`` -> ``retrain.service`` -> back, and
``serving.registry`` <-> ``serving.vertex``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

PACKAGES = ("retrain", "triggers", "pipelines", "components", "serving")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for imported in names:
            module = imported
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module:
                yield module


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in _imports(path, known) if m != name and m not in parents}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_there_is_no_import_circle() -> None:
    graph = _graph()
    assert "retrain.service" in graph
    assert _circles(graph) == []


def test_the_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]


def _training_stack_after(code: str) -> list[str]:
    """Which of scikit-learn, scipy and pandas a new interpreter has imported after ``code``."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    probe = (
        f"{code}\nimport sys\n"
        "print(' '.join(m for m in ('sklearn', 'scipy', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
        check=True,
    )  # fmt: skip
    return done.stdout.split()


@pytest.mark.parametrize(
    "module",
    [
        "pipelines.retrain_pipeline",
        "pipelines.local_run",
        "pipelines.launchers",
        "pipelines.warm_tasks",
        "pipelines.zygote",
        "retrain.cli",
    ],
)
def test_building_and_launching_a_pipeline_imports_no_training_stack(module: str) -> None:
    """The CLI and the local worker build the pipeline from the components' KFP wrappers;
    only the tasks need scikit-learn, scipy and pandas (seconds of imports per process)."""
    assert _training_stack_after(f"import {module}") == []


def test_the_worker_imports_no_training_stack_for_its_run() -> None:
    """What ``run_locally`` imports inside: kfp.local, the run's report reader, the
    pipeline it builds, and the hook that sends its tasks to the task zygote."""
    code = """
from pathlib import Path
import kfp.local
from components.runs import RunContext, read_failure, read_report, report_uri
from pipelines import warm_tasks
from pipelines.byo import pipeline_for
from retrain.config import load_settings
settings = load_settings(Path("retrain.yaml"))
pipeline_for(settings, "rainfall", "image", local_run=True)
warm_tasks.install(settings.local.state_dir, 0)
"""
    assert _training_stack_after(code) == []
