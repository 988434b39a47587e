"""The gate policy: every rule listed with its numbers; ties and stale candidates rejected."""

from __future__ import annotations

from typing import Any

import pytest

from retrain.config import Gate
from retrain.gatekeeper.policy import Pointer, decide
from retrain.messages import EvaluatedModel, MetricsReport

pytestmark = pytest.mark.unit

GATE = Gate.model_validate(
    {
        "primary_metric": "roc_auc",
        "min_eval_rows": 200,
        "thresholds": {"roc_auc": {"min": 0.70}, "log_loss": {"max": 0.6}},
        "min_improvement": {"absolute": 0.005},
        "max_regression": {"accuracy": 0.02, "log_loss": 0.05},
    }
)


def report(candidate: dict[str, float], champion: dict[str, float] | None = None,
           **changes: Any) -> MetricsReport:  # fmt: skip
    base = {"rows": 600.0, "accuracy": 0.80, "log_loss": 0.45, "roc_auc": 0.812}
    return MetricsReport(
        model="rainfall",
        run_id="run-7",
        request_id="k",
        reason="data",
        status="succeeded",
        candidate=EvaluatedModel(artifact_uri="gs://a/7", metrics={**base, **candidate}),
        champion=None if champion is None else EvaluatedModel(
            artifact_uri="gs://a/6", version="6", metrics={**base, **champion}
        ),
        **changes,
    )  # fmt: skip


def test_first_version_needs_only_value_thresholds() -> None:
    verdict = decide(report({}), GATE, now=Pointer())
    assert verdict.promote
    assert verdict.reasons == [
        "eval rows 600 >= min 200: pass",
        "roc_auc 0.812 >= min 0.700: pass",
        "log_loss 0.450 <= max 0.600: pass",
        "first version: value thresholds only: pass",
    ]


def test_value_threshold_failure_names_the_rule_and_numbers() -> None:
    verdict = decide(report({"roc_auc": 0.65, "rows": 120.0}), GATE, now=Pointer())
    assert not verdict.promote
    assert "eval rows 120 >= min 200: FAIL" in verdict.reasons
    assert "roc_auc 0.650 >= min 0.700: FAIL" in verdict.reasons


def test_too_small_an_improvement_over_the_champion_fails() -> None:
    verdict = decide(report({"roc_auc": 0.812}, {"roc_auc": 0.808}), GATE, now=Pointer("6", 1))
    assert not verdict.promote
    assert (
        "roc_auc improvement over v6 +0.0040 >= required +0.0050 (absolute): FAIL"
        in verdict.reasons
    )


def test_enough_improvement_and_no_guard_regression_promotes() -> None:
    verdict = decide(report({"roc_auc": 0.830}, {"roc_auc": 0.808}), GATE, now=Pointer("6", 1))
    assert verdict.promote, verdict.reasons
    assert "accuracy regression vs v6 +0.0000 <= max 0.0200: pass" in verdict.reasons


def test_guard_metric_regression_fails_and_log_loss_counts_lower_as_better() -> None:
    verdict = decide(
        report({"roc_auc": 0.83, "accuracy": 0.75, "log_loss": 0.55},
               {"roc_auc": 0.80, "accuracy": 0.80, "log_loss": 0.45}),
        GATE,
        now=Pointer("6", 1),
    )  # fmt: skip
    assert not verdict.promote
    assert "accuracy regression vs v6 +0.0500 <= max 0.0200: FAIL" in verdict.reasons
    assert "log_loss regression vs v6 +0.1000 <= max 0.0500: FAIL" in verdict.reasons


def test_relative_improvement() -> None:
    gate = GATE.model_copy(update={"min_improvement": GATE.min_improvement.model_copy(
        update={"absolute": None, "relative": 0.01})})  # fmt: skip
    verdict = decide(report({"roc_auc": 0.82}, {"roc_auc": 0.80}), gate, now=Pointer("6", 1))
    assert verdict.promote, verdict.reasons
    assert any("+0.0200 >= required +0.0080 (1.0% of 0.800)" in r for r in verdict.reasons)


def test_a_candidate_compared_with_an_old_champion_is_stale() -> None:
    verdict = decide(report({"roc_auc": 0.90}, {"roc_auc": 0.80}), GATE, now=Pointer("7", 2))
    assert not verdict.promote
    assert verdict.reasons[-1] == (
        "stale: evaluated against v6, but the champion is now v7 (pointer generation 2): FAIL"
    )
    first = decide(report({}), GATE, now=Pointer("7", 1))
    assert first.reasons[-1] == (
        "stale: evaluated against no champion, but the champion is now v7 (pointer generation "
        "1): FAIL"
    )


def test_a_champion_that_moved_away_and_back_makes_the_report_stale() -> None:
    """Issue 11, finding 8: staleness by the pointer's generation, not the version label. v6
    was read at generation 3; a promotion and a rollback later, v6 serves at generation 5."""
    seen = report({"roc_auc": 0.90}, {"roc_auc": 0.80})
    assert seen.champion is not None
    seen = seen.model_copy(update={"champion": seen.champion.model_copy(update={"generation": 3})})
    assert decide(seen, GATE, now=Pointer("6", 3)).promote
    verdict = decide(seen, GATE, now=Pointer("6", 5))
    assert not verdict.promote
    assert verdict.reasons[-1] == (
        "stale: evaluated against v6 (pointer generation 3), but the champion is now v6 "
        "(pointer generation 5): FAIL"
    )


@pytest.mark.parametrize("absolute", [0.0, None])
def test_a_tie_keeps_the_champion(absolute: float | None) -> None:
    """Issue 11, finding 5: the same model trained again on the same data (+0.0000) is not
    promoted, with the shipped margin (0.0) or none; nor is an equal score with a lower
    guard metric."""
    gate = GATE.model_copy(update={"min_improvement": GATE.min_improvement.model_copy(
        update={"absolute": absolute}), "max_regression": {"accuracy": 0.02}})  # fmt: skip
    same = decide(report({}, {}), gate, now=Pointer("6", 1))
    assert not same.promote
    assert "no improvement over v6: roc_auc +0.0000: FAIL" in same.reasons
    lower = decide(report({"accuracy": 0.79}, {"accuracy": 0.80}), gate, now=Pointer("6", 1))
    assert not lower.promote
    better = decide(report({"roc_auc": 0.813}, {}), gate, now=Pointer("6", 1))
    assert better.promote, better.reasons


def test_a_failed_run_is_rejected_with_its_error() -> None:
    failed = MetricsReport(
        model="rainfall", run_id="r", request_id="k", reason="data", status="failed",
        error="ValidationError: x.csv: column 'rain': rule label_not_binary",
        failed_step="preprocess",
    )  # fmt: skip
    verdict = decide(failed, GATE, now=Pointer("6", 1))
    assert not verdict.promote
    assert verdict.reasons == [
        "the run failed in preprocess: ValidationError: x.csv: column 'rain': rule "
        "label_not_binary: FAIL"
    ]


def test_a_metric_that_is_not_a_number_fails_the_gate() -> None:
    verdict = decide(report({"roc_auc": float("nan")}), GATE, now=Pointer())
    assert not verdict.promote
    assert "roc_auc is nan, not a number the gate can compare: FAIL" in verdict.reasons


@pytest.mark.parametrize(("policy", "promoted"), [("hold", False), ("thresholds_only", True)])
def test_a_champion_that_lacks_features_is_a_schema_change_for_the_policy(
    policy: str, promoted: bool
) -> None:
    unscored = EvaluatedModel(
        artifact_uri="gs://a/6", version="6", metrics={}, missing_features=["visibility"]
    )
    gate = GATE.model_copy(update={"on_schema_change": policy})

    verdict = decide(report({}, champion=None).model_copy(update={"champion": unscored}),
                     gate, now=Pointer("6"))  # fmt: skip

    assert verdict.promote is promoted
    [change] = [r for r in verdict.reasons if "schema change" in r]
    assert "v6 needs features ['visibility'] that the new data lacks" in change
    assert f"gate.on_schema_change is {policy}" in change
    assert change.endswith(": pass" if promoted else ": FAIL")
