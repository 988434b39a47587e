"""The canary policy: complete or roll back on the live metric, each rule with its numbers;
not judged until enough labelled canary traffic exists."""

from __future__ import annotations

import math

import pytest

from retrain.config import Canary
from retrain.gatekeeper.canary import judge, live_of
from retrain.gatekeeper.registry import CanaryState

pytestmark = pytest.mark.unit

STATE = CanaryState(version="3", previous="2", percent=10, started_at=0.0, generation=3)
SPEC = Canary(percent=10, min_labelled=300, max_regression=0.02)


def live(canary: float, previous: float, labelled: float = 350, metric: str = "roc_auc",
         previous_labelled: float = 3000) -> dict[str, dict[str, float]]:  # fmt: skip
    return {
        "3": {metric: canary, "labelled": labelled, "served": labelled * 2},
        "2": {metric: previous, "labelled": previous_labelled, "served": previous_labelled * 2},
    }


def test_a_worse_canary_rolls_back_with_its_numbers() -> None:
    verdict = judge(STATE, SPEC, "roc_auc", live(0.71, 0.80))
    assert verdict is not None
    assert not verdict.promote
    assert verdict.reasons == [
        "canary v3 served 10% of the traffic: 350 labelled predictions >= min 300; v2 3000: pass",
        "live roc_auc v3 0.710 vs v2 0.800 on the same window: regression +0.0900 <= max "
        "0.0200: FAIL",
    ]


@pytest.mark.parametrize(
    ("canary", "promote"),
    [(0.80, True), (0.85, True), (0.781, True), (0.7799, False)],
)
def test_the_canary_completes_within_max_regression(canary: float, promote: bool) -> None:
    verdict = judge(STATE, SPEC, "roc_auc", live(canary, 0.80))
    assert verdict is not None
    assert verdict.promote is promote


def test_a_lower_is_better_metric_regresses_upwards() -> None:
    spec = Canary(percent=10, min_labelled=300, max_regression=0.05, metric="log_loss")
    worse = judge(STATE, spec, "roc_auc", live(0.60, 0.40, metric="log_loss"))
    better = judge(STATE, spec, "roc_auc", live(0.30, 0.40, metric="log_loss"))
    assert worse is not None and better is not None  # noqa: PT018
    assert not worse.promote
    assert "regression +0.2000 <= max 0.0500: FAIL" in worse.reasons[1]
    assert better.promote
    assert "regression -0.1000 <= max 0.0500: pass" in better.reasons[1]


def test_the_metric_defaults_to_the_gate_primary_metric() -> None:
    verdict = judge(STATE, SPEC, "accuracy", live(0.70, 0.80, metric="accuracy"))
    assert verdict is not None
    assert "live accuracy v3 0.700 vs v2 0.800" in verdict.reasons[1]


@pytest.mark.parametrize(
    "numbers",
    [
        live(0.5, 0.9, labelled=299),  # not enough labelled canary predictions
        live(0.5, 0.9, previous_labelled=0),  # nothing to compare with
        live(math.nan, 0.9),  # e.g. roc_auc of labels of one class
        {"3": {"roc_auc": 0.5, "labelled": 400}},  # the previous version's numbers missing
        {"4": {"roc_auc": 0.5, "labelled": 400}, "3": {"roc_auc": 0.9, "labelled": 900}},
    ],
)
def test_not_judged_yet(numbers: dict[str, dict[str, float]]) -> None:
    assert judge(STATE, SPEC, "roc_auc", numbers) is None


def test_a_missing_metric_is_an_error_naming_it() -> None:
    numbers = live(0.7, 0.8)
    del numbers["2"]["roc_auc"]
    with pytest.raises(ValueError, match=r"live\['2'\]\['roc_auc'\]: missing"):
        judge(STATE, SPEC, "roc_auc", numbers)


def test_live_of_keeps_the_two_versions_numbers_only() -> None:
    numbers = {**live(0.7, 0.8), "1": {"roc_auc": 0.5, "labelled": 10.0}}
    numbers["3"]["precision"] = 0.4
    assert live_of(numbers, STATE, "roc_auc") == {
        "3": {"roc_auc": 0.7, "labelled": 350.0, "served": 700.0},
        "2": {"roc_auc": 0.8, "labelled": 3000.0, "served": 6000.0},
    }
