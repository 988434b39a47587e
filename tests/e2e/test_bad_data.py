"""Bad data costs one quarantine record and nothing else, on the whole local stack: each kind
of bad upload is quarantined with its rule, the champion serves throughout, and the next
good upload trains and is decided."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from retrain.config import MIB, load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.statedb import Database
from tests.conftest import QUICK_MODEL, rainfall, settled, write_config
from tests.e2e.test_gatekeeper import predict, retrain_cli, served_version

pytestmark = pytest.mark.e2e

EVERY, WATCHED, RESHAPED = MODELS = ("every", "watched", "reshaped")
RAINFALL = rainfall(6000)
FEATURES = [c for c in RAINFALL.columns if c not in ("day", "rain")]
GOOD = RAINFALL.iloc[3000:3400]


def csv(frame: pd.DataFrame) -> bytes:
    return str(frame.to_csv(index=False)).encode()


def three_classes() -> bytes:
    frame = GOOD.copy()
    frame.loc[frame.index[:10], "rain"] = 2
    return csv(frame)


def two_hundred_thousand_rows() -> bytes:
    frame = pd.concat([RAINFALL] * 34, ignore_index=True).iloc[:200_000]
    return csv(frame.assign(day=np.arange(len(frame)) + 100_000))


# name -> (content, the rule it breaks, the columns it names)
BAD: dict[str, tuple[Any, str, list[str]]] = {
    "renamed.csv": (
        lambda: csv(GOOD.set_axis([f"c{i}" for i in range(GOOD.shape[1])], axis=1)),
        "missing_column", ["day", "rain"],
    ),
    "no-label.csv": (lambda: csv(GOOD.drop(columns=["rain"])), "missing_column", ["rain"]),
    "three-classes.csv": (three_classes, "label_not_binary", ["rain"]),
    "words.csv": (
        lambda: csv(GOOD.assign(temperature=["warm"] * len(GOOD))), "non_numeric", ["temperature"]
    ),
    "header-only.csv": (lambda: ",".join(GOOD.columns).encode() + b"\n", "empty", []),
    "binary.csv": (lambda: bytes(range(256)) * 64, "unreadable", []),
    "blank-feature.csv": (
        lambda: csv(GOOD.assign(visibility=np.nan)), "all_null", ["visibility"]
    ),
    "ten-rows.csv": (lambda: csv(GOOD.iloc[:10]), "too_few_rows", []),
    "200k-rows.csv": (two_hundred_thousand_rows, "too_large", []),
}  # fmt: skip


# Any new data drifts, so that the drift policy trains on every good upload.
ALWAYS_DRIFTS = {"psi_threshold": 1e-9, "ks_pvalue": 0.999, "min_drifted_features": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = {**QUICK_MODEL, "validation": {"max_object_bytes": 16 * MIB}}
    watched = {**base, "arrival_policy": "on_drift_or_degradation", "drift": ALWAYS_DRIFTS}
    models = {EVERY: base, WATCHED: watched, RESHAPED: watched}
    assert tuple(models) == MODELS
    models = {name: {**spec, "data_prefix": f"{name}/"} for name, spec in models.items()}
    path = write_config(tmp_path_factory.mktemp("bad-data"), models=models)
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


@pytest.fixture(scope="module")
def state(stack: Stack) -> Database:
    s = stack.settings
    return Database(emulators.firestore_client(stack.firestore_host, s.project, s.database))


class Predictions:
    """Ask the prediction server for the model's answer, over and over, counting failures;
    bounded in count and time."""

    def __init__(self, stack: Stack, model: str, limit: int = 5000, seconds: float = 600) -> None:
        self.stack, self.model, self.limit, self.seconds = stack, model, limit, seconds
        self.ok = 0
        self.failed: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        deadline = time.monotonic() + self.seconds
        row = [float(v) for v in GOOD[FEATURES].iloc[0]]
        while not self.stopping.is_set() and self.ok + len(self.failed) < self.limit:
            if time.monotonic() > deadline:
                return
            try:
                predict(self.stack, self.model, [row])
                self.ok += 1
            except (urllib.error.URLError, OSError) as exc:
                self.failed.append(repr(exc))
            self.stopping.wait(0.05)

    def __enter__(self) -> Predictions:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def peak_memory_mib(stack: Stack, part: str) -> float:
    """The part's peak resident memory (VmHWM), in MiB."""
    pid = next(p.pid for p in stack.status() if p.name == part)
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return kib / 1024


@pytest.fixture(scope="module")
def ledger(state: Database) -> FirestoreLedger:
    return FirestoreLedger(state)


@pytest.fixture
def registry(stack: Stack, state: Database, gcs: Any) -> FirestoreRegistry:
    return FirestoreRegistry(state, stack.settings.buckets.models, gcs)


@pytest.fixture(scope="module")
def bucket(stack: Stack, ledger: FirestoreLedger) -> Any:
    """The data bucket, once every model has its first champion (v1, served), trained side
    by side."""
    gcs = emulators.storage_client(stack.gcs_url, stack.settings.project)
    data = gcs.bucket(stack.settings.buckets.data)
    for model in MODELS:
        data.blob(f"{model}/good-0.csv").upload_from_string(csv(RAINFALL.iloc[:3000]))
    for model in MODELS:
        settled(ledger, model, runs=1)
        assert wait_until(lambda m=model: served_version(stack, m) == "1",  # type: ignore[misc]
                          timeout=60, interval=0.2)  # fmt: skip
    return data


def log_lines(stack: Stack, part: str) -> list[dict[str, Any]]:
    lines = (stack.logs / f"{part}.log").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_each_kind_of_bad_upload_is_quarantined_and_costs_nothing_else(
    stack: Stack,
    bucket: Any,
    ledger: FirestoreLedger,
    registry: FirestoreRegistry,
    record_property: Any,
) -> None:
    """For a model of each arrival policy, side by side."""
    models = (EVERY, WATCHED)
    with Predictions(stack, EVERY) as every, Predictions(stack, WATCHED) as watched:
        for model in models:
            for name, (content, _, _) in BAD.items():
                bucket.blob(f"{model}/bad/{name}").upload_from_string(content())
        for model in models:
            assert wait_until(lambda m=model: len(ledger.quarantined(m)) >= len(BAD),  # type: ignore[misc]
                              timeout=180), ledger.quarantined(model)  # fmt: skip
        for model in models:
            good = csv(RAINFALL.iloc[3000:6000])
            bucket.blob(f"{model}/good-1.csv").upload_from_string(good)
        runs = {model: settled(ledger, model, runs=2) for model in models}
        for predictions in (every, watched):
            assert wait_until(lambda p=predictions: p.ok > 20, timeout=30, interval=0.2)  # type: ignore[misc]

    log = log_lines(stack, "on_data_arrival")
    for model, predictions in ((EVERY, every), (WATCHED, watched)):
        held = {Path(q["object"]).name: q for q in ledger.quarantined(model)}
        for name, (_, rule, columns) in BAD.items():
            assert held[name]["rule"] == rule, held[name]["error"]
            assert held[name]["columns"] == columns, held[name]["error"]
            assert name in held[name]["error"]
        assert not predictions.failed, predictions.failed[:5]
        first, second = runs[model]
        assert [first.state, second.state] == ["succeeded", "succeeded"], second.error
        assert not [uri for uri in second.data_uris if "/bad/" in uri]
        assert second.data_uris[-1].endswith("good-1.csv")
        assert registry.decision(model, second.run_id) is not None  # decided, either way
        # One structured ERROR line per bad object, and no traceback.
        for name in BAD:
            errors = [line for line in log if line["severity"] == "ERROR"
                      and line.get("object", "").endswith(f"{model}/bad/{name}")]  # fmt: skip
            assert len(errors) == 1, errors
            assert errors[0]["action"] == "quarantined"
            assert errors[0]["rule"] == BAD[name][1]
    assert "Traceback" not in (stack.logs / "on_data_arrival.log").read_text(encoding="utf-8")
    for server in ("scheduler", "serving"):  # the servers' lines: one JSON object each
        lines = (stack.logs / f"{server}.log").read_text(encoding="utf-8").splitlines()
        assert lines, server
        assert all(isinstance(json.loads(line), dict) for line in lines if line.strip())
    peak = peak_memory_mib(stack, "on_data_arrival")
    record_property("on_data_arrival_peak_mib", round(peak))
    assert peak < 1024, f"the arrival check's peak memory {peak:.0f} MiB is over 1 GiB"


def test_quarantine_lists_and_releases_from_the_cli(
    stack: Stack, bucket: Any, ledger: FirestoreLedger
) -> None:
    name = f"{EVERY}/bad/cli-ten-rows.csv"
    bucket.blob(name).upload_from_string(csv(GOOD.iloc[:10]))
    uri = f"gs://{bucket.name}/{name}"
    assert wait_until(lambda: uri in [q["object"] for q in ledger.quarantined(EVERY)],
                      timeout=60)  # fmt: skip

    listed = retrain_cli(stack, "quarantine", EVERY)
    assert listed.returncode == 0, listed.stderr
    assert "cli-ten-rows.csv" in listed.stdout
    assert "too_few_rows" in listed.stdout
    released = retrain_cli(stack, "quarantine", "release", uri)
    assert released.returncode == 0, released.stderr
    assert "released" in released.stdout
    assert uri not in [q["object"] for q in ledger.quarantined(EVERY)]
    again = retrain_cli(stack, "quarantine", "release", uri)
    assert again.returncode == 1
    assert "is not quarantined" in again.stderr
    unknown = retrain_cli(stack, "quarantine", "nope")
    assert unknown.returncode == 2
    assert "is not a model" in unknown.stderr


def test_a_dropped_feature_is_a_schema_change_that_holds_the_champion(
    stack: Stack, bucket: Any, ledger: FirestoreLedger, registry: FirestoreRegistry
) -> None:
    fewer = RAINFALL.iloc[3000:6000].drop(columns=["visibility"])
    bucket.blob(f"{RESHAPED}/good-1.csv").upload_from_string(csv(fewer))
    _, second = settled(ledger, RESHAPED, runs=2)

    arrival = next(line for line in log_lines(stack, "on_data_arrival")
                   if line.get("object", "").endswith(f"{RESHAPED}/good-1.csv"))  # fmt: skip
    assert "schema change" in arrival["detail"], arrival
    assert "['visibility']" in arrival["detail"]
    assert second.state == "succeeded", second.error
    kept = registry.decision(RESHAPED, second.run_id)
    assert kept is not None
    decision = kept["decision"]
    assert decision["verdict"] == "rejected"
    [why] = [r for r in decision["reasons"] if "schema change" in r]
    assert "v1 needs features ['visibility']" in why
    assert "gate.on_schema_change is hold" in why
    assert served_version(stack, RESHAPED) == "1"
    version = str(decision["new_version"])
    promoted = retrain_cli(stack, "promote", RESHAPED, version, "--reason", "reviewed")
    assert promoted.returncode == 0, promoted.stderr
    seven = [[0.0] * (len(FEATURES) - 1)]  # the new version's features

    def serves_it() -> bool:
        try:
            return str(predict(stack, RESHAPED, seven)["modelVersionId"]) == version
        except urllib.error.HTTPError:
            return False

    assert wait_until(serves_it, timeout=60, interval=0.2)
