"""A second real dataset, configured in retrain.yaml alone, on the whole local stack: the
Palmer penguins as the package ships them (tests/penguins.py: text categories, columns
that are not features, unlabelled rows, ISO dates) go upload -> arrival check -> run ->
gate -> served, and the prediction server takes their categorical values."""

from __future__ import annotations

import json
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
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.statedb import Database
from tests import penguins
from tests.conftest import settled, write_config
from tests.e2e.test_gatekeeper import endpoint

pytestmark = pytest.mark.e2e

MODEL = "penguins"
GENTOO = {
    "Species": "Gentoo penguin (Pygoscelis papua)",
    "Island": "Biscoe",
    "Clutch Completion": "Yes",
    "Culmen Length (mm)": 49.5,
    "Culmen Depth (mm)": 16.1,
    "Flipper Length (mm)": 224,
    "Body Mass (g)": 5650,
    "Delta 15 N (o/oo)": 8.4,
    "Delta 13 C (o/oo)": -26.1,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model = {**penguins.CONFIG, "coalesce_seconds": 0.5, "schedule": None}
    path = write_config(tmp_path_factory.mktemp("penguins"), models={MODEL: model})
    with Stack(load_settings(path), path).running_stack() as started:
        yield started


def post(stack: Stack, instances: list[Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        endpoint(stack, MODEL) + ":predict",
        data=json.dumps({"instances": instances}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def served(stack: Stack) -> str | None:
    status, answer = post(stack, [GENTOO])
    return str(answer["modelVersionId"]) if status == 200 else None


def test_the_penguins_go_from_upload_to_served_by_configuration_alone(
    stack: Stack, tmp_path: Path
) -> None:
    settings = stack.settings
    state = Database(
        emulators.firestore_client(stack.firestore_host, settings.project, settings.database)
    )
    ledger = FirestoreLedger(state)
    gcs = emulators.storage_client(stack.gcs_url, settings.project)
    registry = FirestoreRegistry(state, settings.buckets.models, gcs)
    bucket = gcs.bucket(settings.buckets.data)
    seasons = penguins.seasons(tmp_path)

    for count, season in enumerate(seasons[:2], start=1):
        bucket.blob(f"penguins/{season.name}").upload_from_filename(str(season))
        runs = settled(ledger, MODEL, runs=count)
        run = runs[-1]
        assert run.state == "succeeded", run.error
        decision = registry.decision(MODEL, run.run_id)
        assert decision is not None
        assert decision["decision"]["verdict"] == "promoted", decision
        assert wait_until(lambda c=count: served(stack) == str(c), timeout=60, interval=0.2)  # type: ignore[misc]
    # Every object passed the arrival check: nothing quarantined for text, extra columns,
    # unlabelled rows or dates.
    assert ledger.quarantined(MODEL) == []
    assert len(runs[-1].data_uris) == 2

    names = list(GENTOO)
    adelie = GENTOO | {
        "Species": "Adelie Penguin (Pygoscelis adeliae)",
        "Island": "Torgersen",
        "Culmen Length (mm)": 36.6,
        "Culmen Depth (mm)": 17.8,
        "Flipper Length (mm)": 185,
        "Body Mass (g)": 3700,
    }
    by_name = [GENTOO, adelie]
    by_position = [[row[n] for n in names] for row in by_name]
    status, named = post(stack, by_name)
    assert status == 200, named
    status, positional = post(stack, by_position)
    assert status == 200, positional
    assert named["predictions"] == positional["predictions"]
    assert [p["label"] for p in named["predictions"]] == ["MALE", "FEMALE"]
    # A category never seen in training is a missing value: an answer, not an error.
    status, unseen = post(stack, [GENTOO | {"Island": "Anvers"}, GENTOO | {"Island": None}])
    assert status == 200, unseen
    assert unseen["predictions"][0] == unseen["predictions"][1]
    status, refused = post(stack, [GENTOO | {"Island": ["Biscoe"]}])
    assert status == 400
    assert "feature 'Island': expected a category" in json.dumps(refused)

    # The champion's metadata carries the categories the server used.
    champion = registry.champion(MODEL)
    assert champion is not None
    assert champion.version == "2"
    summary = pd.read_csv(seasons[0])
    assert set(summary["Island"].dropna()) <= {"Biscoe", "Dream", "Torgersen"}
