"""`retrain demo` as a user runs it, shortened to cross the drift point: every chunk
settles, every run it causes is decided, and the report is written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_config

pytestmark = pytest.mark.e2e

CHECKS = {"no_drift", "drift", "degradation"}
MONITOR_ALERTS = {"serving_drift", "degradation"}


def test_make_demo_command_crosses_the_drift_point_and_decides_every_run(
    tmp_path: Path,
) -> None:
    """Three chunks from row 11,000 (the concept changes at 12,000), on the demo's own stack."""
    config = write_config(tmp_path)
    report = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "retrain", "demo", "--config", str(config), "--chunks", "3",
         "--start-at", "11000", "--report", str(report),
         "--data", str(ROOT / "data" / "rainfall.csv.gz")],
        capture_output=True, text=True, timeout=400, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    rows = {}
    for line in done.stdout.splitlines():
        cells = line.split()
        if cells and re.fullmatch(r"\d+-\d+", cells[0]):
            rows[cells[0]] = cells
    assert list(rows) == ["11000-11999", "12000-12999", "13000-13999"], done.stdout
    caused = 0
    lives = []
    for start, cells in rows.items():
        live, check, alerts, runs = cells[4], cells[5], cells[6], " ".join(cells[7:])
        assert check in CHECKS, (start, cells)
        assert alerts == "-" or set(alerts.split(",")) <= MONITOR_ALERTS, (start, cells)
        # a run for every chunk that drifted (on arrival or as served), a decision for each
        assert (runs != "-") == (check != "no_drift" or alerts != "-"), (start, cells)
        verdicts = [] if runs == "-" else runs.split(", ")
        assert all(re.fullmatch(r"(promoted|rejected)( v\d+)?", v) for v in verdicts), cells
        caused += len(verdicts)
        assert 0.4 < float(cells[2]) <= 1
        lives.append(live)
    # the labels of a chunk arrive with the next one: the live accuracy follows them
    assert lives[0] == "-", lives
    assert all(0.4 < float(live) <= 1 for live in lives[1:]), lives
    # the drift point is crossed: the champion was retrained on the new concept
    assert any(rows[r][5] != "-" for r in ("12000-12999", "13000-13999")), done.stdout
    summary = re.search(r"(\d+) runs for 3 chunks .*; (\d+) promotions, (\d+) rejections",
                        done.stdout)  # fmt: skip
    assert summary, done.stdout
    total, promotions, rejections = map(int, summary.groups())
    assert total == caused == promotions + rejections

    html = report.read_text(encoding="utf-8")
    assert "data:image/png;base64," in html
    assert report.with_suffix(".png").stat().st_size > 10_000
    (own,) = [p for p in (tmp_path / "state").iterdir() if p.name.startswith("demo-")]
    assert not (own / "state" / "stack.json").exists()  # its own stack, stopped again
