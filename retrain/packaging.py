"""What ``make deploy`` uploads: the functions' source, and each model's compiled pipeline.

The functions' source holds only the project modules that ``triggers/main.py`` imports,
directly or through other project modules (lazy imports inside functions included), plus
``retrain.yaml`` and a ``requirements.txt`` pinned from ours: the distributions those
modules import and everything they depend on, at the versions that ``make test`` tests.
Terraform (``infra/terraform``) uploads ``functions.zip`` and ``pipelines/<model>.yaml``
from the build folder.
"""

from __future__ import annotations

import ast
import re
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from retrain.config import Settings

__all__ = ["Package", "compile_pipelines", "function_source", "package_functions"]

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("components", "pipelines", "retrain", "serving", "triggers")
ENTRY = "triggers.main"
# Always needed by the runtime, though the source never imports them by these names.
RUNTIME = ("functions-framework",)
# Imported only by the local backend's code (the local worker's process checks), which the
# functions never run in the cloud: kept out of their requirements.
LOCAL_ONLY = frozenset({"psutil"})
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


@dataclass(frozen=True)
class Package:
    zip_path: Path
    modules: list[str]  # project modules in the zip
    requirements: list[str]  # pinned lines of its requirements.txt


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(path: Path, module: str) -> set[str]:
    """Every module name that ``path`` imports at run time, at any depth of its code
    (imports under ``if TYPE_CHECKING:`` are for the type checker only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if _type_checking_only(node):
            todo += node.orelse  # type: ignore[attr-defined]
            continue
        todo += ast.iter_child_nodes(node)
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # submodules
    return names


def function_source(root: Path = ROOT) -> tuple[list[str], set[str]]:
    """The project modules that the functions need, and the third-party top-level names."""
    seen: set[str] = set()
    third_party: set[str] = set()
    todo = [ENTRY]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        top = name.partition(".")[0]
        if top not in PROJECT_PACKAGES:
            if (
                top
                and top not in sys.stdlib_module_names
                and top not in ("__future__", *LOCAL_ONLY)
            ):
                third_party.add(top)
            continue
        path = _module_file(name, root)
        if path is None:
            continue  # ``from package import name`` where name is not a module
        seen.add(name)
        parents = name.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]  # their __init__
        todo += sorted(_imports(path, name))
    return sorted(seen), third_party


def _pins(requirements: Path) -> dict[str, str]:
    """Canonical distribution name -> its pinned line, as requirements.txt spells it."""
    pins = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        if match := _NAME.match(line.strip()):
            pins[_canonical(match[1])] = line.strip()
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: set[str]) -> set[str]:
    """The distributions providing ``names`` (top-level imports) and all their requirements."""
    providers = metadata.packages_distributions()
    todo = [_canonical(dist) for top in names for dist in providers.get(top, [])]
    todo += [_canonical(name) for name in RUNTIME]
    found: set[str] = set()
    while todo:
        dist = todo.pop()
        if dist in found:
            continue
        found.add(dist)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement:
                continue  # optional extras are not installed by a plain requirement
            if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", requirement):
                todo.append(_canonical(match[1]))
    return found


def package_functions(config_path: Path, out_dir: Path, root: Path = ROOT) -> Package:
    """Write ``out_dir/functions.zip``: main.py at the top, as Cloud Functions expects."""
    modules, third_party = function_source(root)
    pins = _pins(root / "requirements.txt")
    needed = _closure(third_party)
    requirements = sorted((pins[name] for name in needed if name in pins), key=str.lower)
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / "functions.zip"
    header = "# Generated by `retrain package` from requirements.txt: what the functions import.\n"
    entries: dict[str, bytes] = {}
    for module in modules:
        path = _module_file(module, root)
        assert path is not None  # noqa: S101 (function_source found it)
        entries[path.relative_to(root).as_posix()] = path.read_bytes()
    entries["main.py"] = (root / "triggers" / "main.py").read_bytes()
    entries["retrain.yaml"] = config_path.read_bytes()
    entries["requirements.txt"] = (header + "\n".join(requirements) + "\n").encode()
    # The same source gives the same bytes (no timestamps, sorted): Terraform names the
    # uploaded object by its MD5, so the functions are rebuilt only when the source changes.
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entries[name])
    return Package(zip_path, modules, requirements)


def compile_pipelines(settings: Settings, out_dir: Path) -> list[Path]:
    """Each model's pipeline (with its own custom steps) for the project's component image."""
    from kfp import compiler  # noqa: PLC0415

    from pipelines.byo import pipeline_for  # noqa: PLC0415

    folder = out_dir / "pipelines"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model in settings.models:
        path = folder / f"{model}.yaml"
        compiler.Compiler().compile(
            pipeline_for(settings, model, settings.component_image), str(path)
        )
        written.append(path)
    return written
