"""The status dashboard, in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.statedb import Database
from tests.conftest import ROOT, write_config

pytestmark = pytest.mark.e2e

# What the probe of this machine kind found to work headless, as root, with no network.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    path = write_config(tmp_path_factory.mktemp("dashboard"))
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser test: `make test` installs Debian's chromium")
    pytest.skip("Chromium is not installed (apt-get install chromium; `make test` does it as root)")


def test_dashboard_shows_a_promotion_made_during_the_test(stack: Stack, tmp_path: Path) -> None:
    browser = chromium()
    gcs = emulators.storage_client(stack.gcs_url, stack.settings.project)
    rows = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=3000)
    gcs.bucket(stack.settings.buckets.data).blob("rainfall/first.csv").upload_from_string(
        rows.rename(columns={"Unnamed: 0": "day"}).to_csv(index=False)
    )
    gcs.bucket(stack.settings.buckets.data).blob("rainfall/header-only.csv").upload_from_string(
        "day,temperature,rain\n"
    )
    settings = stack.settings
    db = Database(emulators.firestore_client(stack.firestore_host, settings.project,
                                             settings.database))  # fmt: skip
    registry = FirestoreRegistry(db, settings.buckets.models, gcs)
    assert wait_until(lambda: registry.champion("rainfall") is not None, timeout=120, interval=0.5)
    ledger = FirestoreLedger(db)
    assert wait_until(lambda: bool(ledger.quarantined("rainfall")), timeout=60, interval=0.5)
    (decision,) = registry.decisions("rainfall")
    run_id = decision["decision"]["run_id"]
    url = f"http://{stack.settings.local.host}:{stack.settings.local.ports.serving}/"

    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "rainfall: champion v1" in page, page[:3000]
    assert '<td class="promoted">promoted</td>' in page
    assert run_id in page  # the run, in the decisions and the runs tables
    assert "first version: value thresholds only: pass" in page  # the decision's reasons
    assert "<svg" in page  # the chart of the primary metric per version
    assert "Quarantined objects (1)" in page
    assert "rainfall/header-only.csv" in page
    assert '<td class="rejected">empty</td>' in page
    # the live loop's sections (the canary's own figures: tests/e2e/test_canary.py)
    assert "no canary: the champion serves all traffic" in page
    assert "<h3>Monitor windows</h3>" in page
    assert "Live roc_auc per version (late labels)" in page
