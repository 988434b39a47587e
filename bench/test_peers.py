"""Ours against the peers (MLServer, a plain kfp.local pipeline) and the floors, interleaved
rounds: ``python -m bench.peers`` (bench/peers), which prints each round and the tables.

Run with ``make bench`` (which builds .venv-peers first). Fails only if it cannot run or a
request fails; the figures are for reading. BENCH_PEERS_ARGS adds options, e.g.
``BENCH_PEERS_ARGS="--workers 2"`` (see ``python -m bench.peers --help``).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(3600)  # 3 rounds take about 10 minutes on a quiet 2-core machine
def test_ours_against_the_peers() -> None:
    argv = [sys.executable, "-m", "bench.peers", "--rounds", "3",
            *shlex.split(os.environ.get("BENCH_PEERS_ARGS", ""))]  # fmt: skip
    # Output goes straight to the terminal (make bench runs pytest -s): rounds print as they end.
    done = subprocess.run(argv, cwd=ROOT, timeout=3600, check=False)
    assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}"
