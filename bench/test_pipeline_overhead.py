"""Local pipeline run: wall time vs the pure compute of its steps, on the rainfall data.

Run with ``make bench``. Prints the figures; asserts nothing about speed.
"""

import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from kfp import dsl, local

from components.evaluate.report import evaluate_and_report
from components.preprocess import preprocess
from components.runs import RunContext
from components.train import train
from pipelines.launchers import run_and_follow
from retrain import statedb
from retrain.bus import PubsubBus
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import new_run_id
from retrain.localstack import Stack

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]


def _noop() -> None:
    """A task that does nothing: the floor of what kfp.local costs per task."""


# (no `from __future__ import annotations` here: kfp reads the annotations at runtime)
noop = dsl.component(func=_noop, base_image="python:3.11", install_kfp_package=False)


def _compute(stack: Stack, uri: str, workdir: Path) -> dict[str, float]:
    """Each step's core, in this process, with imports and clients already warm."""
    settings = stack.settings
    model = settings.models["rainfall"]
    run = RunContext("rainfall", new_run_id("rainfall"), "bench", "manual")
    times = {}
    started = time.perf_counter()
    split = preprocess([uri], model, workdir / "pre")
    times["preprocess"] = time.perf_counter() - started
    started = time.perf_counter()
    train(split.train_path, model, workdir / "model", summary_path=split.summary_path)
    times["train"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluate_and_report(
        settings,
        run,
        model_dir=workdir / "model",
        eval_path=split.eval_path,
        summary_path=split.summary_path,
        registry=FirestoreRegistry(statedb.database(settings), settings.buckets.models),
        bus=PubsubBus(settings.project),
    )
    times["evaluate"] = time.perf_counter() - started
    return times


def test_local_pipeline_overhead(
    stack: Stack, gcs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in stack.env().items():
        monkeypatch.setenv(name, value)
    rows = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=3000)
    rows = rows.rename(columns={"Unnamed: 0": "day"})
    name = f"rainfall/bench-{time.time_ns()}.csv"
    gcs.bucket(stack.settings.buckets.data).blob(name).upload_from_string(rows.to_csv(index=False))
    uri = f"gs://{stack.settings.buckets.data}/{name}"

    _compute(stack, uri, tmp_path / "warm-up")
    compute = _compute(stack, uri, tmp_path / "timed")
    runs = [run_and_follow(stack, "rainfall", [uri]) for _ in range(3)]
    assert all(r.state == "succeeded" for r in runs), [r.error for r in runs]
    wall = sorted(r.seconds for r in runs)[1]  # the median of three

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "noop"))
    floors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            started = time.perf_counter()
            noop()
            floors.append(time.perf_counter() - started)
    floor = sorted(floors)[1]

    total = sum(compute.values())
    tasks = 4  # preprocess, train, evaluate, and the exit handler
    overhead = wall - total
    print()
    print("local pipeline run on 3,000 rainfall rows (median of 3 runs)")
    print(f"  wall time of the run:            {wall:6.2f} s")
    for step, seconds in compute.items():
        print(f"  compute, {step:<10}               {seconds:6.2f} s")
    print(f"  compute, sum of the 3 steps:     {total:6.2f} s")
    print(f"  orchestration overhead:          {overhead:6.2f} s ({overhead / wall:.0%} of wall)")
    print(f"  overhead per step (3 steps):     {overhead / 3:6.2f} s")
    print(f"  overhead per task (4 tasks):     {overhead / tasks:6.2f} s")
    print(f"  ratio wall / compute:            {wall / total:6.2f}")
    print(f"  floor: a no-op kfp.local task:   {floor:6.2f} s")
