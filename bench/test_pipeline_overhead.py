"""Local pipeline run: wall time vs the pure compute of its steps, on the rainfall data.

Run with ``make bench``. Prints the figures; asserts nothing about speed.
"""

import re
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from kfp import dsl, local

from bench.peers.pipelines import ours_compute
from pipelines import warm_tasks
from pipelines.launchers import local_environment, run_and_follow
from pipelines.local_run import RunResult
from retrain.config import load_settings
from retrain.localstack import Stack

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]


def _noop() -> None:
    """A task that does nothing: the floor of what kfp.local costs per task."""


# (no `from __future__ import annotations` here: kfp reads the annotations at runtime)
noop = dsl.component(func=_noop, base_image="python:3.11", install_kfp_package=False)


def _forked(stack: Stack) -> int:
    """Tasks the stack's task zygote has forked so far (its log says each)."""
    log = stack.state_dir / warm_tasks.LOG
    text = log.read_text(encoding="utf-8") if log.exists() else ""
    return len(re.findall(r"task \d+: [a-z_]+$", text, flags=re.MULTILINE))


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])


def _compute(stack: Stack, uri: str, workdir: Path) -> dict[str, float]:
    """Each step's core, in this process, with imports and clients already warm."""
    return ours_compute(stack, "rainfall", uri, workdir)


def _cold(stack: Stack, directory: Path) -> Stack:
    """The same stack, under a config whose local runs start each task cold (as kfp.local
    does: a new Python process per task)."""
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    raw["local"]["task_zygote_idle_seconds"] = 0
    path = directory / "cold.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return Stack(load_settings(path), path)


def _noop_floor(root: Path) -> float:
    """A no-op task run by plain kfp.local (cold) in this process: median of three."""
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    floors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            started = time.perf_counter()
            noop()
            floors.append(time.perf_counter() - started)
    return _median(floors)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def test_local_pipeline_overhead(
    stack: Stack, gcs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in stack.env().items():
        monkeypatch.setenv(name, value)
    rows = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=3000)
    rows = rows.rename(columns={"Unnamed: 0": "day"})
    # Not under the model's data prefix: no data-arrival run competes with the timed ones.
    name = f"bench/rainfall-{time.time_ns()}.csv"
    gcs.bucket(stack.settings.buckets.data).blob(name).upload_from_string(rows.to_csv(index=False))
    uri = f"gs://{stack.settings.buckets.data}/{name}"
    cold = _cold(stack, tmp_path)

    _compute(stack, uri, tmp_path / "warm-up")
    # The task zygote, as the launcher starts it, ready before the timed runs.
    idle = stack.settings.local.task_zygote_idle_seconds
    zygote = warm_tasks.ensure(stack.state_dir, local_environment(stack), idle)
    ready = zygote is not None and warm_tasks.wait_ready(zygote)
    computes: list[dict[str, float]] = []
    warm_runs: list[RunResult] = []
    cold_runs: list[RunResult] = []
    forked_before = _forked(stack)
    loads = []
    for i in range(3):  # rounds: compute in-process, a warm run and a cold run, alternating
        loads.append(_load())
        computes.append(_compute(stack, uri, tmp_path / f"timed-{i}"))
        pair = [(warm_runs, stack), (cold_runs, cold)]
        for runs, which in pair if i % 2 == 0 else reversed(pair):
            runs.append(run_and_follow(which, "rainfall", [uri]))
    forked = _forked(stack) - forked_before
    for run in warm_runs + cold_runs:
        assert run.state == "succeeded", run.error

    floor = _noop_floor(tmp_path / "noop")

    compute = {step: _median([c[step] for c in computes]) for step in computes[0]}
    total = _median([sum(c.values()) for c in computes])
    steps, tasks = 3, 4  # preprocess, train, evaluate; and the exit handler
    print()
    print("local pipeline run on 3,000 rainfall rows: 3 rounds (medians); load per round:")
    print(f"  {' | '.join(loads)}")
    warm = "yes" if ready else "NO (its runs ran cold)"
    print(f"  task zygote ready before the runs: {warm}; tasks it forked: {forked} (of 12)")
    for step, seconds in compute.items():
        print(f"  compute in-process, {step:<10}           {seconds:6.2f} s")
    print(f"  compute in-process, the 3 steps:         {total:6.2f} s")
    for label, runs in (("warm (task zygote)", warm_runs), ("cold (kfp.local)", cold_runs)):
        wall = _median([r.seconds for r in runs])
        overhead = wall - total
        print(f"  {label}:")
        print(f"    walls of the 3 runs:                   "
              f"{', '.join(f'{r.seconds:.2f}' for r in runs)} s")  # fmt: skip
        print(f"    wall time of the run (median):         {wall:6.2f} s")
        print(f"    orchestration overhead:                {overhead:6.2f} s")
        print(f"    overhead per step, (wall - compute)/3: {overhead / steps:6.2f} s")
        print(f"    overhead per task (4 tasks):           {overhead / tasks:6.2f} s")
        print(f"    ratio wall / compute:                  {wall / total:6.2f}")
    print(f"  floor: a no-op kfp.local task:           {floor:6.2f} s")
    print(f"  load after: {_load()}")
