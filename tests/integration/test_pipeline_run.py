"""`retrain run` on the real local stack: kfp.local, fake-gcs-server and the Pub/Sub emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
import pytest
import yaml
from google.cloud import pubsub_v1
from sklearn.datasets import load_breast_cancer

from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.messages import MetricsReport, decode
from tests.conftest import ROOT, unique

pytestmark = pytest.mark.integration

RAINFALL = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=4000).rename(
    columns={"Unnamed: 0": "day"}
)
METRICS = {"roc_auc", "accuracy", "log_loss", "precision", "recall", "rows"}


def model_config(
    stack: Stack, directory: Path, base: str = "rainfall", **changes: Any
) -> tuple[Path, str]:
    """A config for the running stack plus one uuid-named model, so registry state is its own."""
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    name = unique(base)
    raw["models"] = {name: {**raw["models"]["rainfall"], "data_prefix": f"{name}/", **changes}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path, name


@pytest.fixture
def config_with(stack: Stack, tmp_path: Path) -> Callable[..., tuple[Path, str]]:
    def make(base: str = "rainfall", **changes: Any) -> tuple[Path, str]:
        return model_config(stack, tmp_path, base, **changes)

    return make


@pytest.fixture
def metrics_subscription(stack: Stack, subscriber: pubsub_v1.SubscriberClient) -> Iterator[str]:
    """A pull subscription of our own on model-metrics (the gatekeeper has its push one)."""
    project = stack.settings.project
    name = subscriber.subscription_path(project, unique("metrics"))
    subscriber.create_subscription(
        name=name, topic=f"projects/{project}/topics/{stack.settings.topics.model_metrics}"
    )
    yield name
    subscriber.delete_subscription(subscription=name)


def pull_report(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, run_id: str
) -> tuple[MetricsReport, dict[str, str], str]:
    for _ in range(10):
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=10)
        for received in response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[received.ack_id])
            report = decode(MetricsReport, received.message.data)
            if report.run_id == run_id:
                return report, dict(received.message.attributes), received.message.message_id
    pytest.fail(f"no MetricsReport for run {run_id}")


def retrain_run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "retrain", "run", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "COLUMNS": "250"},
    )


def upload(gcs: Any, stack: Stack, name: str, frame: pd.DataFrame) -> str:
    bucket = stack.settings.buckets.data
    gcs.bucket(bucket).blob(name).upload_from_string(frame.to_csv(index=False))
    return f"gs://{bucket}/{name}"


@dataclass(frozen=True)
class FirstRun:
    """`retrain run` of a new model on the first 3,000 rows, and the report it published."""

    config: Path
    model: str
    frame: pd.DataFrame
    uri: str
    run_id: str
    result: subprocess.CompletedProcess[str]
    report: MetricsReport
    attributes: dict[str, str]
    message_id: str


@pytest.fixture(scope="module")
def first_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstRun]:
    """One run that three tests read (its report; its artifacts against the component CLIs';
    its candidate as the champion of a second run): a run takes 20-40 s."""
    subscriber = emulators.subscriber(stack.pubsub_host)
    gcs = emulators.storage_client(stack.gcs_url, stack.settings.project)
    project = stack.settings.project
    subscription = subscriber.subscription_path(project, unique("metrics"))
    subscriber.create_subscription(
        name=subscription, topic=f"projects/{project}/topics/{stack.settings.topics.model_metrics}"
    )
    try:
        config, model = model_config(stack, tmp_path_factory.mktemp("first-run"))
        frame = RAINFALL.iloc[:3000]
        uri = upload(gcs, stack, f"{model}/rows-0-2999.csv", frame)
        run_id = unique("run")
        result = retrain_run(config, model, "--data", uri, "--run-id", run_id)
        assert result.returncode == 0, result.stderr
        report, attributes, message_id = pull_report(subscriber, subscription, run_id)
        yield FirstRun(config, model, frame, uri, run_id, result, report, attributes, message_id)
    finally:
        subscriber.delete_subscription(subscription=subscription)
        subscriber.close()


def test_run_publishes_a_metrics_report_that_checks_out_field_by_field(
    stack: Stack, gcs: Any, first_run: FirstRun
) -> None:
    model, uri, run_id, result = first_run.model, first_run.uri, first_run.run_id, first_run.result
    report, attributes, message_id = first_run.report, first_run.attributes, first_run.message_id

    assert result.returncode == 0, result.stderr
    for step in ("preprocess-data", "train-model", "evaluate-model"):
        assert f"{step}: ok" in result.stderr
    assert f"message {message_id}" in result.stdout
    assert attributes == {"model": model, "schema_version": "1"}
    assert report.model == model
    assert report.run_id == run_id
    assert report.request_id == f"manual-{run_id}"
    assert report.reason == "manual"
    assert report.status == "succeeded"
    assert report.error is None
    assert report.failed_step is None
    prefix = f"gs://{stack.settings.buckets.artifacts}/runs/{model}/{run_id}"
    assert report.candidate is not None
    assert report.candidate.artifact_uri == f"{prefix}/model"
    assert set(report.candidate.metrics) == METRICS
    assert report.candidate.metrics["rows"] == 600  # the newest 20 % of 3,000
    assert 0.75 < report.candidate.metrics["roc_auc"] <= 1
    assert 0.6 < report.candidate.metrics["accuracy"] <= 1
    assert report.champion is None  # a new model
    assert report.eval_data_uris == [f"{prefix}/eval.parquet"]
    assert report.train_data_uris == [uri]
    assert report.train_rows == {uri: 3000}
    assert (report.window_rows, report.fit_rows) == (3000, 2400)  # minus the newest 20 %
    artifacts = gcs.bucket(stack.settings.buckets.artifacts)
    stored = {b.name for b in artifacts.list_blobs(prefix=f"runs/{model}/{run_id}/")}
    assert stored == {
        f"runs/{model}/{run_id}/{name}"
        for name in (
            "model/model.joblib",
            "model/metadata.json",
            "eval.parquet",
            "report.json",
            "published.json",
        )
    }
    # The report is kept (create-only) before it is published; the message id apart.
    kept = json.loads(artifacts.blob(f"runs/{model}/{run_id}/report.json").download_as_bytes())
    assert set(kept) == {"report"}
    assert MetricsReport.model_validate(kept["report"]) == report
    published = artifacts.blob(f"runs/{model}/{run_id}/published.json").download_as_bytes()
    assert json.loads(published) == {"message_id": message_id}


def test_failed_step_publishes_a_failure_report_and_exits_non_zero(
    stack: Stack,
    gcs: Any,
    subscriber: pubsub_v1.SubscriberClient,
    metrics_subscription: str,
    config_with: Callable[..., tuple[Path, str]],
) -> None:
    config, model = config_with()
    bad = RAINFALL.iloc[:3000].copy()
    bad.loc[bad.index[:5], "rain"] = 2
    uri = upload(gcs, stack, f"{model}/three-classes.csv", bad)
    run_id = unique("run")

    result = retrain_run(config, model, "--data", uri, "--run-id", run_id)

    assert result.returncode == 1
    assert "preprocess-data: FAILED" in result.stderr
    assert "train-model" not in result.stderr, "nothing runs after a validation failure"
    said = " ".join(result.stderr.split())
    assert f"step preprocess failed: ValidationError: {uri}: column 'rain'" in said
    assert "rule label_not_binary" in said
    report, _, message_id = pull_report(subscriber, metrics_subscription, run_id)
    assert f"message {message_id}" in result.stdout
    assert report.status == "failed"
    assert report.failed_step == "preprocess"
    assert report.error is not None
    assert "label_not_binary" in report.error
    assert report.candidate is None


def test_champion_is_scored_on_the_same_rows(
    stack: Stack,
    registry: FirestoreRegistry,
    ledger: FirestoreLedger,
    subscriber: pubsub_v1.SubscriberClient,
    metrics_subscription: str,
    first_run: FirstRun,
) -> None:
    config, model, uri, first = first_run.config, first_run.model, first_run.uri, first_run.run_id
    assert first_run.report.champion is None
    # Make the first candidate the champion, as the gatekeeper does: copied into the
    # registry bucket, registered, and the pointer moved (its generation to 1).
    candidate = f"{stack.settings.run_prefix(model, first)}/model"
    champion_uri = registry.keep_artifact(model, first, candidate)
    assert champion_uri.startswith(f"gs://{stack.settings.buckets.models}/")
    version = registry.register(model, {"run_id": first, "artifact_uri": champion_uri,
                                        "metrics": {}})  # fmt: skip
    assert registry.promote(model, version, 0, by="test", reason="the first candidate")
    # (This config's model is unknown to the stack's gatekeeper: end the run as it would.)
    assert ledger.finish(model, first, "succeeded"), "retrain run held the model's lease"
    second = unique("run")

    result = retrain_run(config, model, "--data", uri, "--run-id", second)

    assert result.returncode == 0, result.stderr
    assert "champion v1" in result.stdout
    report, _, _ = pull_report(subscriber, metrics_subscription, second)
    assert report.champion is not None
    assert report.candidate is not None
    assert report.champion.version == version == "1"
    assert report.champion.generation == 1, "the pointer's generation, for the stale check"
    assert report.champion.artifact_uri == champion_uri
    # Same data and seed give the same model, so identical scores prove the same rows.
    assert report.champion.metrics == report.candidate.metrics


def test_another_dataset_works_by_configuration_alone(
    stack: Stack,
    gcs: Any,
    subscriber: pubsub_v1.SubscriberClient,
    metrics_subscription: str,
    config_with: Callable[..., tuple[Path, str]],
) -> None:
    cancer = load_breast_cancer(as_frame=True).frame
    cancer.insert(0, "seq", range(len(cancer)))  # a made-up order column
    config, model = config_with(
        base="cancer",
        label="target",
        order_column="seq",
        training_window={"rows": None},
        evaluation={"fraction": 0.25, "min_rows": 100},
        gate={"primary_metric": "roc_auc", "min_eval_rows": 100},
        estimator={"name": "RandomForestClassifier", "params": {"n_estimators": 50}},
        arrival_policy="every_arrival",
        schedule=None,
    )
    uri = upload(gcs, stack, f"{model}/cancer.csv", cancer)
    run_id = unique("run")

    result = retrain_run(config, model, "--data", uri, "--run-id", run_id)

    assert result.returncode == 0, result.stderr
    report, _, _ = pull_report(subscriber, metrics_subscription, run_id)
    assert report.candidate is not None
    assert report.candidate.metrics["rows"] == round(0.25 * len(cancer))
    assert report.candidate.metrics["roc_auc"] > 0.95


def test_component_clis_give_the_same_artifacts_as_the_pipeline(
    stack: Stack, gcs: Any, tmp_path: Path, first_run: FirstRun
) -> None:
    config, model, frame = first_run.config, first_run.model, first_run.frame
    uri, run_id = first_run.uri, first_run.run_id
    outputs = stack.state_dir / "runs" / run_id / "outputs"
    local_copy = tmp_path / "rows.csv"
    frame.to_csv(local_copy, index=False)

    def cli(component: str, *args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", f"components.{component}", "--config", str(config),
             *args],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, **stack.env()},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    cli("preprocess", "--model", model, "--input", uri, "--output-dir", str(tmp_path / "pre"))
    cli("train", "--model", model, "--train-data", str(tmp_path / "pre" / "train.parquet"),
        "--summary", str(tmp_path / "pre" / "summary.json"), "--output-dir",
        str(tmp_path / "model"))  # fmt: skip
    metrics_file = tmp_path / "metrics.json"
    subprocess.run(
        [sys.executable, "-m", "components.evaluate", "--candidate", str(tmp_path / "model"),
         "--eval-data", str(tmp_path / "pre" / "eval.parquet"), "--output", str(metrics_file)],
        check=True, capture_output=True, timeout=120, env={**os.environ, **stack.env()},
    )  # fmt: skip

    (pipeline_train,) = outputs.rglob("preprocess-data/train_data")
    (pipeline_eval,) = outputs.rglob("preprocess-data/eval_data")
    (pipeline_summary,) = outputs.rglob("preprocess-data/summary")
    (pipeline_model,) = outputs.rglob("train-model/model_artifact")
    pd.testing.assert_frame_equal(
        pd.read_parquet(pipeline_train), pd.read_parquet(tmp_path / "pre" / "train.parquet")
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(pipeline_eval), pd.read_parquet(tmp_path / "pre" / "eval.parquet")
    )
    assert json.loads(pipeline_summary.read_text(encoding="utf-8")) == json.loads(
        (tmp_path / "pre" / "summary.json").read_text(encoding="utf-8")
    )
    in_pipeline, by_cli = (
        json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        for folder in (pipeline_model, tmp_path / "model")
    )
    for metadata in (in_pipeline, by_cli):  # where the local train file sat differs, by design
        assert metadata["training_data"].pop("file").endswith(("train_data", "train.parquet"))
    assert in_pipeline == by_cli
    rows = pd.read_parquet(pipeline_eval).drop(columns=["day", "rain"])
    ours = joblib.load(pipeline_model / "model.joblib").predict_proba(rows)
    theirs = joblib.load(tmp_path / "model" / "model.joblib").predict_proba(rows)
    assert (ours == theirs).all()
    kept = json.loads(
        gcs.bucket(stack.settings.buckets.artifacts)
        .blob(f"runs/{model}/{run_id}/report.json")
        .download_as_bytes()
    )
    cli_metrics = json.loads(metrics_file.read_text(encoding="utf-8"))["candidate"]
    assert kept["report"]["candidate"]["metrics"] == pytest.approx(cli_metrics)


def test_container_component_is_refused_for_a_local_run_with_a_clear_message(
    config_with: Callable[..., tuple[Path, str]],
) -> None:
    example = ROOT / "components" / "examples" / "train-container.yaml"
    config, model = config_with(components={"train": str(example)})

    result = retrain_run(config, model, "--data", "gs://unused/x.csv")

    assert result.returncode == 2
    said = " ".join(result.stderr.split())
    assert "local runs (kfp.local's SubprocessRunner) support Python components only" in said
    assert "Traceback" not in result.stderr


def test_retrain_run_is_refused_while_another_run_holds_the_model(
    config_with: Callable[..., tuple[Path, str]], ledger: FirestoreLedger
) -> None:
    """`retrain run` takes the model's lease like any run the ledger launches: while
    another run holds it, it starts nothing and says what to do instead."""
    config, model = config_with()
    assert ledger.acquire(model, f"{model}-other-run", ttl=600).acquired

    result = retrain_run(config, model, "--data", f"gs://retrain-data/{model}/x.csv")

    assert result.returncode == 1
    said = " ".join(result.stderr.split())
    assert f"run {model}-other-run of {model} is in flight" in said
    assert "`retrain publish manual` queues a run" in said
    assert [r.run_id for r in ledger.runs(model)] == [f"{model}-other-run"]


SCHEDULED_JOB = """
import sys
from pathlib import Path

from kfp import local

from pipelines.retrain_pipeline import retrain_pipeline

local.init(local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[3])
retrain_pipeline(
    model=sys.argv[1], data_uris=[], request_id="", reason="schedule", run_id="",
    config_yaml=Path(sys.argv[2]).read_text(encoding="utf-8"),
)
"""


def test_a_scheduled_job_without_run_id_or_data_trains_on_the_window_under_its_own_name(
    stack: Stack,
    gcs: Any,
    subscriber: pubsub_v1.SubscriberClient,
    metrics_subscription: str,
    config_with: Callable[..., tuple[Path, str]],
    tmp_path: Path,
) -> None:
    """What `retrain schedule sync` submits: no run id, no data URIs (see RunContext.parse)."""
    config, model = config_with()
    first = upload(gcs, stack, f"{model}/a.csv", RAINFALL.iloc[:1500])
    second = upload(gcs, stack, f"{model}/b.csv", RAINFALL.iloc[1500:3000])

    done = subprocess.run(
        [sys.executable, "-c", SCHEDULED_JOB, model, str(config), str(tmp_path / "root")],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, **stack.env()},
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for _ in range(10):
        response = subscriber.pull(subscription=metrics_subscription, max_messages=10, timeout=10)
        reports = [decode(MetricsReport, r.message.data) for r in response.received_messages]
        mine = [r for r in reports if r.model == model]
        if mine:
            break
    else:
        pytest.fail(f"no MetricsReport for {model}")
    report = mine[0]
    assert report.status == "succeeded", report.error
    assert report.run_id.startswith("retrain-"), "named after the pipeline job"
    assert report.request_id == report.run_id
    assert report.reason == "schedule"
    assert sorted(report.train_rows) == [first, second]
    assert sum(report.train_rows.values()) == 3000
