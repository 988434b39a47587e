"""The pipeline peer: a plain kfp.local pipeline (``@dsl.component`` with its defaults, as
kfp's docs write it; ``SubprocessRunner(use_venv=False)`` by default, or kfp's own default
``use_venv=True``, where each task installs its packages in a fresh venv) doing the compute
of our three steps (read the CSV, window and split; fit HistGradientBoosting; evaluate),
against ``retrain run``'s
pipeline on the same rows. Both are reported as wall time, in-process compute (imports and
clients warm) and the overhead per step.

kfp ships only a step function's source to its task, so each step imports in its body.
"""

# ruff: noqa: PLC0415

import os
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kfp import compiler, dsl, local
from kfp.dsl import Dataset, Input, Metrics, Model, Output
from threadpoolctl import threadpool_limits

__all__ = [
    "PipelineTimes",
    "kfp_peer_compute",
    "kfp_peer_pipeline",
    "run_kfp_peer",
]

STEPS = ("preprocess", "train", "evaluate")


@dataclass(frozen=True)
class PipelineTimes:
    wall: float
    compute: dict[str, float]

    @property
    def overhead_per_step(self) -> float:
        return (self.wall - sum(self.compute.values())) / len(STEPS)


# (no `from __future__ import annotations` in this module: kfp reads these annotations at
# runtime)
def preprocess_rows(
    csv_path: str, window: int, eval_fraction: float,
    train_rows: Output[Dataset], eval_rows: Output[Dataset],
) -> None:  # fmt: skip
    """The latest ``window`` rows by day; the newest ``eval_fraction`` for evaluation."""
    import pandas as pd

    frame = pd.read_csv(csv_path).rename(columns={"Unnamed: 0": "day"})
    frame = frame.sort_values("day", kind="stable", ignore_index=True).tail(window)
    held_out = round(len(frame) * eval_fraction)
    frame.iloc[: len(frame) - held_out].to_parquet(train_rows.path, index=False)
    frame.iloc[len(frame) - held_out :].to_parquet(eval_rows.path, index=False)


def train_rows_model(train_rows: Input[Dataset], max_iter: int, model: Output[Model]) -> None:
    """HistGradientBoostingClassifier on every column but day and rain."""
    import joblib
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame = pd.read_parquet(train_rows.path)
    x = frame.drop(columns=["day", "rain"])
    estimator = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=0.1)
    estimator.fit(x, frame["rain"])
    joblib.dump(estimator, model.path)


def evaluate_model(
    eval_rows: Input[Dataset], model: Input[Model], metrics: Output[Metrics]
) -> None:
    """ROC AUC and accuracy on the held-out rows."""
    import joblib
    import pandas as pd
    from sklearn.metrics import accuracy_score, roc_auc_score

    frame = pd.read_parquet(eval_rows.path)
    estimator = joblib.load(model.path)
    x, y = frame.drop(columns=["day", "rain"]), frame["rain"]
    proba = estimator.predict_proba(x)[:, 1]
    metrics.log_metric("roc_auc", float(roc_auc_score(y, proba)))
    metrics.log_metric("accuracy", float(accuracy_score(y, proba >= 0.5)))


# The pinned versions of what the steps import: with use_venv=True (kfp.local's default
# runner), each task's fresh venv installs them, as a user's packages_to_install would.
PEER_PACKAGES = ("pandas", "pyarrow", "scikit-learn", "joblib")


def kfp_peer_pipeline(use_venv: bool) -> Any:
    """The peer pipeline: kfp.dsl.component's defaults (install_kfp_package too), as kfp's
    docs write it; ``use_venv`` adds packages_to_install (a fresh venv has no pandas). The
    image names the Python of this venv (SubprocessRunner ignores it)."""
    packages = [f"{name}=={version(name)}" for name in PEER_PACKAGES] if use_venv else None

    def component(func: Any) -> Any:
        return dsl.component(func=func, base_image="python:3.11", packages_to_install=packages)

    preprocess, train, evaluate = map(
        component, (preprocess_rows, train_rows_model, evaluate_model)
    )

    def peer(csv_path: str, window: int = 3000, max_iter: int = 200) -> None:
        split = preprocess(csv_path=csv_path, window=window, eval_fraction=0.2)
        trained = train(train_rows=split.outputs["train_rows"], max_iter=max_iter)
        evaluate(eval_rows=split.outputs["eval_rows"], model=trained.outputs["model"])

    return dsl.pipeline(name="peer-retrain")(peer)


class _Artifact(SimpleNamespace):
    """What the steps use of a kfp artifact, for calling them in-process: a path, metrics."""

    def log_metric(self, name: str, value: float) -> None:
        setattr(self, name, value)


def kfp_peer_compute(csv: Path, workdir: Path, window: int, max_iter: int) -> dict[str, float]:
    """The peer's three step functions called in this process, each timed."""
    workdir.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = (
        _Artifact(path=str(workdir / "train")),
        _Artifact(path=str(workdir / "eval")),
    )
    model, metrics = _Artifact(path=str(workdir / "model")), _Artifact(path="")
    times = {}
    with threadpool_limits(limits=1, user_api="openmp"):
        started = time.perf_counter()
        preprocess_rows(str(csv), window, 0.2, train_rows, eval_rows)
        times["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        train_rows_model(train_rows, max_iter, model)
        times["train"] = time.perf_counter() - started
        started = time.perf_counter()
        evaluate_model(eval_rows, model, metrics)
        times["evaluate"] = time.perf_counter() - started
    if not 0.5 < metrics.roc_auc <= 1:
        raise RuntimeError(f"the peer pipeline's model scores roc_auc {metrics.roc_auc}")
    return times


def run_kfp_peer(
    csv: Path, workdir: Path, window: int, max_iter: int, *, use_venv: bool = False
) -> float:
    """The peer pipeline under kfp.local's SubprocessRunner; its wall time in seconds."""
    pipeline = kfp_peer_pipeline(use_venv)
    local.init(runner=local.SubprocessRunner(use_venv=use_venv),
               pipeline_root=str(workdir / "outputs"))  # fmt: skip
    started = time.perf_counter()
    # One OpenMP thread in the tasks, as our steps have (retrain.yaml: threads: 1).
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kfp.local's notes about local execution
            pipeline(csv_path=str(csv), window=window, max_iter=max_iter)  # raises on failure
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return time.perf_counter() - started


def compile_peer(path: Path) -> Path:
    """The peer pipeline compiled to IR YAML (the smoke test checks that it still compiles)."""
    compiler.Compiler().compile(kfp_peer_pipeline(use_venv=False), str(path))
    return path


def ours_compute(stack: Any, model: str, uri: str, workdir: Path) -> dict[str, float]:
    """Our three steps' cores in this process, imports and clients warm (the compute
    that bench/test_pipeline_overhead.py and bench/test_cycle.py compare runs with)."""
    from components.evaluate.report import evaluate_and_report
    from components.preprocess import preprocess
    from components.runs import RunContext
    from components.train import train
    from retrain import statedb
    from retrain.bus import PubsubBus
    from retrain.gatekeeper.registry import FirestoreRegistry
    from retrain.ledger import new_run_id

    settings = stack.settings
    spec = settings.models[model]
    run = RunContext(model, new_run_id(model), "bench", "manual")
    times = {}
    started = time.perf_counter()
    split = preprocess([uri], spec, workdir / "pre")
    times["preprocess"] = time.perf_counter() - started
    started = time.perf_counter()
    train(split.train_path, spec, workdir / "model", summary_path=split.summary_path)
    times["train"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluate_and_report(
        settings, run, model_dir=workdir / "model", eval_path=split.eval_path,
        summary_path=split.summary_path,
        registry=FirestoreRegistry(statedb.database(settings), settings.buckets.models),
        bus=PubsubBus(settings.project),
    )  # fmt: skip
    times["evaluate"] = time.perf_counter() - started
    return times


def run_ours(stack: Any, model: str, uri: str) -> float:
    """``retrain run``'s pipeline (pipelines.launchers.run_and_follow); its wall seconds."""
    from pipelines.launchers import run_and_follow

    result = run_and_follow(stack, model, [uri], timeout=600)
    if result.state != "succeeded":
        raise RuntimeError(f"retrain run ended {result.state}: {result.error}")
    return result.seconds
