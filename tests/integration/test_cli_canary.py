"""`retrain versions` shows a canary (its version, share, since when) and each canary
decision with its live numbers, in the table and in JSON (on the session stack)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from retrain.bus import PubsubBus
from retrain.config import load_settings
from retrain.gatekeeper.decisions import Gatekeeper
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack
from retrain.messages import EvaluatedModel
from tests.conftest import SHIPPED_MODEL, unique
from tests.integration.test_cli_outcomes import World

pytestmark = pytest.mark.integration

GOOD = {"roc_auc": 0.80, "accuracy": 0.80, "log_loss": 0.45, "rows": 600.0}


@pytest.fixture
def canary_world(
    stack: Stack,
    tmp_path: Path,
    ledger: FirestoreLedger,
    registry: FirestoreRegistry,
    publisher: Any,
    gcs: Any,
) -> World:
    model = unique("cli-canary")
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    gate = {**SHIPPED_MODEL["gate"], "canary": {"percent": 10, "min_labelled": 50}}
    raw["models"] = {model: {**SHIPPED_MODEL, "data_prefix": f"{model}/", "schedule": None,
                             "gate": gate}}  # fmt: skip
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    settings = load_settings(config)
    bus = PubsubBus(settings.project, publisher)
    return World(config, settings, model, ledger, Gatekeeper(settings, ledger, registry, bus), gcs)


def test_versions_shows_the_canary_and_its_decision(
    canary_world: World, registry: FirestoreRegistry
) -> None:
    world = canary_world
    world.succeed(GOOD)
    champion = EvaluatedModel(artifact_uri="gs://x/1", version="1", generation=1, metrics=GOOD)
    run_id = world.succeed({**GOOD, "roc_auc": 0.85}, champion=champion)
    state = registry.canary(world.model)
    assert state is not None

    listed = world.cli("versions", world.model, columns=200)
    assert listed.exit_code == 0, listed.output
    assert "v2 * champion canary 10% canary" in listed.stdout
    assert "canary v2: serves 10% beside v1 (90%) since" in listed.stdout
    as_json = json.loads(world.cli("versions", world.model, "-o", "json").stdout)
    assert as_json["canary"] == {"version": "2", "previous": "1", "percent": 10,
                                 "started_at": state.started_at, "generation": 2}  # fmt: skip
    assert [v["canary"] for v in as_json["versions"]] == [False, True]

    live = {"2": {"roc_auc": 0.70, "labelled": 60.0, "served": 120.0},
            "1": {"roc_auc": 0.80, "labelled": 600.0, "served": 1200.0}}  # fmt: skip
    decision = world.gatekeeper.settle_canary(world.model, live)
    assert decision is not None
    assert decision.verdict == "rolled_back"

    listed = world.cli("versions", world.model, columns=200)
    assert listed.exit_code == 0, listed.output
    assert "canary v2: serves" not in listed.stdout
    assert "champion v1: set by canary (canary v2 worse on its live metric)" in listed.stdout
    assert "  canary rolled back at " in listed.stdout
    assert "    live v2: roc_auc 0.7000, labelled 60, served 120" in listed.stdout
    assert "    live v1: roc_auc 0.8000, labelled 600, served 1200" in listed.stdout
    assert (
        "  - live roc_auc v2 0.700 vs v1 0.800 on the same window: regression +0.1000 <= max "
        "0.0200: FAIL" in listed.stdout
    )
    as_json = json.loads(world.cli("versions", world.model, "-o", "json").stdout)
    assert as_json["canary"] is None
    (kept,) = as_json["canary_decisions"]
    assert kept["decision"]["run_id"] == run_id
    assert kept["decision"]["live"] == live
    assert kept["message_id"]
    assert as_json["champion"]["version"] == "1"
