"""The images (issue 13): base images pinned by digest, the same in both; the serving image
installs requirements-serving.txt only, at requirements.txt's versions, and that list holds
every distribution that ``serving.vertex_container`` imports."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "components" / "Dockerfile", ROOT / "serving" / "Dockerfile"]
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)", re.MULTILINE)


def _pins(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in _PIN.findall(text)}


def test_base_images_are_pinned_by_digest() -> None:
    bases = [
        line.split()[1]
        for path in DOCKERFILES
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("FROM ")
    ]
    assert len(bases) == len(DOCKERFILES)
    for base in bases:
        assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    assert len(set(bases)) == 1, bases


def test_the_serving_image_installs_only_what_serving_needs() -> None:
    text = (ROOT / "serving" / "Dockerfile").read_text(encoding="utf-8")
    dockerfile = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "pip install --no-deps -r requirements-serving.txt" in dockerfile
    assert "requirements.txt" not in dockerfile.replace("requirements-serving.txt", "")
    serving, everything = _pins(ROOT / "requirements-serving.txt"), _pins(ROOT / "requirements.txt")
    assert {n: everything.get(n) for n in serving} == serving  # the versions we test with
    for heavy in ("kfp", "google-cloud-aiplatform", "kubernetes", "matplotlib", "pyarrow"):
        assert heavy not in serving


# Imported when installed, not needed: serving ran without them (docs/deploy-gcp.md, "Images").
OPTIONAL = {
    "pyarrow": "pandas.compat imports it if it is there",
    "psutil": "joblib's loky backend imports it if it is there",
}


def test_serving_requirements_cover_what_it_imports() -> None:
    probe = (
        "import sys, serving.vertex_container, sklearn.ensemble, sklearn.linear_model\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    modules = set(done.stdout.split()) - set(sys.stdlib_module_names) - {"google"}
    ours = {"retrain", "serving", "components", "pipelines", "triggers"}
    owners = packages_distributions()
    needed = {
        re.sub(r"[-_.]+", "-", dist).lower()
        for module in modules - ours
        if not module.startswith("_")
        for dist in owners.get(module, [])
    }
    # The gs:// model folder is read with google-cloud-storage (imported when first used).
    needed.add("google-cloud-storage")
    missing = needed - set(_pins(ROOT / "requirements-serving.txt")) - set(OPTIONAL)
    assert not missing, f"serving imports these, not in requirements-serving.txt: {missing}"
