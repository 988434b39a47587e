"""What a step's thread limit (the model's ``threads``) does to the train step's fit, on an
idle machine and on a busy one (one busy-loop process per CPU, started and stopped here,
by pid), with OpenMP's threads spinning while they wait (its default, ``active``) or
sleeping (``OMP_WAIT_POLICY=PASSIVE``).

Run with ``make bench``. Each figure is the median of a few fits of the shipped estimator
(HistGradientBoosting, 200 iterations) on the shipped window (3,000 rainfall rows), in a
fresh process per limit; prints the figures, asserts only that every fit finished.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.compute import available_cpus

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3

FIT = """
import sys, time
import pandas as pd
from components.compute import thread_limit
from components.train.training import build_estimator
frame = pd.read_csv(sys.argv[1]).rename(columns={"Unnamed: 0": "day"}).iloc[:3000]
x, y = frame.drop(columns=["day", "rain"]), frame["rain"]
limit = int(sys.argv[2]) or None
for _ in range(int(sys.argv[3])):
    estimator = build_estimator("HistGradientBoostingClassifier", {"max_iter": 200})
    with thread_limit(limit):
        started = time.perf_counter()
        estimator.fit(x, y)
        print(time.perf_counter() - started)
"""


@contextmanager
def busy(processes: int) -> Iterator[None]:
    """``processes`` busy loops, stopped (by pid) on the way out."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait(timeout=10)


def fits(threads: int, wait_policy: str) -> list[float]:
    env = {**os.environ, "OMP_WAIT_POLICY": wait_policy}
    done = subprocess.run(
        [sys.executable, "-c", FIT, str(ROOT / "data" / "rainfall.csv.gz"), str(threads),
         str(ROUNDS)],
        capture_output=True, text=True, timeout=600, check=True, cwd=ROOT, env=env,
    )  # fmt: skip
    return [float(line) for line in done.stdout.split()]


@pytest.mark.timeout(1800)
def test_thread_limit_of_the_train_step() -> None:
    cpus = available_cpus()
    limits = sorted({1, cpus})
    rows = []
    for machine, load in (("idle", 0), ("busy", cpus)):
        with busy(load):
            for policy in ("ACTIVE", "PASSIVE"):
                for threads in limits:
                    times = fits(threads, policy)
                    assert len(times) == ROUNDS
                    row = (machine, policy.lower(), threads, statistics.median(times))
                    rows.append((*row, min(times), max(times)))
    print(f"\nHistGradientBoosting fit, 3,000 rows, 200 iterations; {cpus} CPU(s) available")
    print("machine  OpenMP wait  threads  median s  [min..max]")
    for machine, policy, threads, median, low, high in rows:
        default = " (default)" if threads == cpus and policy == "active" else ""
        spread = f"[{low:.2f}..{high:.2f}]"
        print(f"{machine:7}  {policy:11}  {threads:7}  {median:8.2f}  {spread}{default}")
