"""The self-deciding canary on the whole local stack (issue 15, acceptance 3 and 4).

A candidate trained on rows whose ``dew point`` and ``visibility`` columns were swapped
passes the offline gate honestly: its evaluation rows are swapped too, and there the
champion scores 0.34 ROC AUC against its 0.84. On live traffic, which is not swapped, it is
the other way round. The canary finds that out from late labels and rolls itself back;
the reverse case (a swapped champion, a clean candidate) completes. Meanwhile a client
keeps predicting, and not one request fails through the split, the rollback or the
completion.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack
from retrain.localstack.processes import wait_until
from tests.conftest import QUICK_MODEL, rainfall, settled, upload, write_config
from tests.e2e.test_gatekeeper import endpoint, retrain_cli, served_version

pytestmark = pytest.mark.e2e

ROWS = rainfall(9000)
FEATURES = [c for c in ROWS.columns if c not in ("day", "rain")]
SWAPPED = ("dew point", "visibility")
CANARY = {"percent": 50, "min_labelled": 150, "max_regression": 0.02}
REQUEST_ROWS = 10  # instances per labelled request


def swapped(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    a, b = SWAPPED
    out[[a, b]] = frame[[b, a]].to_numpy()
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model = {
        **QUICK_MODEL,
        "gate": {**QUICK_MODEL["gate"], "canary": CANARY},
        "serving": {"log_sample_rate": 1.0},
    }
    models = {name: {**model, "data_prefix": f"{name}/"} for name in ("worse", "better")}
    path = write_config(tmp_path_factory.mktemp("canary"), models=models, monitor_seconds=3600)
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


def post(stack: Stack, model: str, rows: list[list[float]], request_id: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["X-Request-Id"] = request_id
    request = urllib.request.Request(
        endpoint(stack, model) + ":predict",
        data=json.dumps({"instances": rows}).encode(),
        headers=headers,
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read()), response.headers.get("X-Request-Id")


class Client(threading.Thread):
    """Predicts one row after another until stopped; keeps every failure and each version."""

    def __init__(self, stack: Stack, model: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.model = stack, model
        self.row = ROWS[FEATURES].iloc[0].tolist()
        self.stopped = threading.Event()
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self.count = 0

    def run(self) -> None:
        while not self.stopped.is_set() and self.count < 100_000:
            try:
                answer, _ = post(self.stack, self.model, [self.row])
                self.versions.add(str(answer["modelVersionId"]))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self.failures.append(repr(exc))
            self.count += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=60)


def labelled_traffic(stack: Stack, model: str, tmp_path: Path) -> dict[str, int]:
    """Clean rows 6,000.. in requests of REQUEST_ROWS, until each version answered enough;
    their labels arrive afterwards through `retrain publish labels`. Rows per version."""
    served: dict[str, int] = {}
    labels = []
    start = 6000
    while min(served.values(), default=0) < CANARY["min_labelled"] + 50 or len(served) < 2:
        assert start + REQUEST_ROWS <= len(ROWS), f"not enough rows for the canary: {served}"
        chunk = ROWS.iloc[start : start + REQUEST_ROWS]
        request_id = f"{model}-{start}"
        answer, echoed = post(stack, model, chunk[FEATURES].to_numpy().tolist(), request_id)
        assert echoed == request_id
        version = str(answer["modelVersionId"])
        served[version] = served.get(version, 0) + len(chunk)
        labels += [
            {"request_id": request_id, "index": i, "label": int(label)}
            for i, label in enumerate(chunk["rain"].tolist())
        ]
        start += REQUEST_ROWS
    path = tmp_path / f"{model}-labels.csv"
    pd.DataFrame(labels).to_csv(path, index=False)
    published = retrain_cli(stack, "publish", "labels", model, str(path))
    assert published.returncode == 0, published.stderr
    return served


def dashboard_status(stack: Stack, model: str) -> Any:
    s = stack.settings
    url = f"http://{s.local.host}:{s.local.ports.serving}/api/status"
    with urllib.request.urlopen(url, timeout=30) as response:
        models = json.loads(response.read())["models"]
    (found,) = [m for m in models if m["name"] == model]
    return found


@pytest.mark.parametrize(
    ("model", "first", "second", "verdict", "served_after"),
    [
        ("worse", ROWS.iloc[:3000], swapped(ROWS.iloc[3000:6000]), "rolled_back", "1"),
        ("better", swapped(ROWS.iloc[:3000]), ROWS.iloc[3000:6000], "promoted", "2"),
    ],
)
def test_a_canary_decides_on_live_labels(
    stack: Stack,
    registry: FirestoreRegistry,
    storage: Any,
    tmp_path: Path,
    model: str,
    first: pd.DataFrame,
    second: pd.DataFrame,
    verdict: str,
    served_after: str,
) -> None:
    ledger = FirestoreLedger(registry.db)
    upload(storage, stack, f"{model}/a.csv", first)
    settled(ledger, model, runs=1)
    assert wait_until(lambda: served_version(stack, model) == "1", timeout=60, interval=0.5)
    client = Client(stack, model)
    client.start()
    try:
        upload(storage, stack, f"{model}/b.csv", second)
        settled(ledger, model, runs=2)
        canary = registry.canary(model)
        assert canary is not None, registry.decisions(model)
        assert (canary.version, canary.previous, canary.percent) == ("2", "1", 50)
        assert wait_until(lambda: "2" in client.versions, timeout=60, interval=0.2)

        status = dashboard_status(stack, model)
        assert status["canary"]["version"] == "2", status["canary"]
        served = labelled_traffic(stack, model, tmp_path)

        said: list[str] = []

        def monitored() -> bool:  # the log is written within seconds, off the request path
            done = retrain_cli(stack, "monitor", model)
            assert done.returncode == 0, done.stderr
            said.append(done.stdout)
            return registry.canary(model) is None

        assert wait_until(monitored, timeout=90, interval=2), said[-1]
        assert registry.pointer(model).version == served_after
        before = client.count
        assert wait_until(lambda: client.count > before + 20, timeout=60, interval=0.2)
        client.versions.clear()
        mark = client.count
        assert wait_until(lambda: client.count > mark + 20, timeout=60, interval=0.2)
        assert client.versions == {served_after}
    finally:
        client.stop()
    assert client.failures == [], client.failures[:5]
    (kept,) = registry.canary_decisions(model)
    assert kept["message_id"]  # published
    decision = kept["decision"]
    assert decision["verdict"] == verdict, decision
    assert decision["stage"] == "canary"
    live = decision["live"]
    metric = "roc_auc"
    if verdict == "rolled_back":
        assert live["2"][metric] < live["1"][metric] - CANARY["max_regression"], live
    else:
        assert live["2"][metric] >= live["1"][metric] - CANARY["max_regression"], live
    assert live["2"]["labelled"] >= CANARY["min_labelled"]
    assert served["2"] >= CANARY["min_labelled"]
