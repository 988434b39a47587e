"""A shortened demo across the drift point: every chunk settles, every run is decided."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrain.config import load_settings
from retrain.demo import load_stream, replay
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.statedb import Database
from tests.conftest import ROOT, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shipped configuration (the drift-driven policy), on a stack of its own."""
    path = write_config(tmp_path_factory.mktemp("demo"))
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


def test_short_replay_settles_every_chunk_and_decides_every_run(stack: Stack) -> None:
    stream = load_stream(ROOT / "data" / "rainfall.csv.gz")

    result = replay(stack, stream, chunks=3, start_chunk_at=11_000)

    assert [c.start for c in result.chunks] == [11_000, 12_000, 13_000]
    settings = stack.settings
    db = Database(emulators.firestore_client(stack.firestore_host, settings.project,
                                             settings.database))  # fmt: skip
    ledger = FirestoreLedger(db)
    registry = FirestoreRegistry(db, settings.buckets.models)
    runs = ledger.runs("rainfall")
    assert len(runs) == 1 + result.runs  # the first upload's run, then the chunks'
    for run in runs:
        assert run.ended_at is not None, run
        assert registry.decision("rainfall", run.run_id) is not None, run.run_id
    caused = [r for c in result.chunks for r in c.runs]
    assert caused == [r.run_id for r in runs[1:]]
    for chunk in result.chunks:
        assert chunk.check in {"no_drift", "drift", "degradation"}
        assert bool(chunk.runs) == (chunk.check != "no_drift")
        assert len(chunk.decisions) == len(chunk.runs)
        assert 0.4 < chunk.served_accuracy <= 1
    assert result.promotions + result.rejections == result.runs
    # the drift point is crossed: the champion was retrained on the new concept
    assert any(c.runs for c in result.chunks if c.start >= 12_000)


def test_make_demo_command_writes_the_table_and_the_report(tmp_path: Path) -> None:
    """`retrain demo` as a user runs it, cut to one chunk (its own stack; this test's config)."""
    config = write_config(tmp_path)
    report = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "retrain", "demo", "--config", str(config), "--chunks", "1",
         "--report", str(report), "--data", str(ROOT / "data" / "rainfall.csv.gz")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3000-3999" in done.stdout
    assert "runs for 1 chunks" in done.stdout
    html = report.read_text(encoding="utf-8")
    assert "data:image/png;base64," in html
    assert report.with_suffix(".png").stat().st_size > 10_000
    (own,) = [p for p in (tmp_path / "state").iterdir() if p.name.startswith("demo-")]
    assert not (own / "state" / "stack.json").exists()  # its own stack, stopped again
