"""The gate policy: is a candidate good enough to replace the champion?

Learned from TFX Evaluator (value and change thresholds) and MLflow ``MetricThreshold``.
Every rule is listed with its numbers, passed or not, so a verdict explains itself:
``roc_auc 0.812 >= min 0.70: pass; improvement over v6 +0.004 < required +0.005: FAIL``.

A tie keeps the champion: the candidate must be strictly better on the primary metric
(and by at least ``min_improvement``), so a run on unchanged data, which trains the same
model again, is rejected with "no improvement over vN" instead of churning versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from retrain.config import Gate
from retrain.messages import MetricsReport

__all__ = ["LOWER_IS_BETTER", "Pointer", "Rule", "Verdict", "decide", "stale"]

LOWER_IS_BETTER = frozenset({"log_loss"})


@dataclass(frozen=True)
class Rule:
    passed: bool
    text: str

    def __str__(self) -> str:
        return f"{self.text}: {'pass' if self.passed else 'FAIL'}"


@dataclass(frozen=True)
class Pointer:
    """The champion pointer at the moment of the decision: the version it names (None
    before the first promotion) and its generation (how many times it has moved)."""

    version: str | None = None
    generation: int = 0


@dataclass(frozen=True)
class Verdict:
    promote: bool
    rules: tuple[Rule, ...]

    @property
    def reasons(self) -> list[str]:
        return [str(rule) for rule in self.rules]


def _value_rules(report: MetricsReport, gate: Gate) -> list[Rule]:
    assert report.candidate is not None  # noqa: S101 (a succeeded report carries it)
    metrics = report.candidate.metrics
    rules = []
    rows = metrics.get("rows", 0.0)
    rules.append(
        Rule(rows >= gate.min_eval_rows, f"eval rows {rows:.0f} >= min {gate.min_eval_rows}")
    )
    for name, number in metrics.items():
        if not math.isfinite(number):
            rules.append(Rule(False, f"{name} is {number}, not a number the gate can compare"))
    for metric, bound in gate.thresholds.items():
        value = metrics.get(metric)
        if value is None:
            rules.append(Rule(False, f"{metric} is missing from the report"))
            continue
        if bound.min is not None:
            rules.append(Rule(value >= bound.min, f"{metric} {value:.3f} >= min {bound.min:.3f}"))
        if bound.max is not None:
            rules.append(Rule(value <= bound.max, f"{metric} {value:.3f} <= max {bound.max:.3f}"))
    return rules


def _change_rules(report: MetricsReport, gate: Gate) -> list[Rule]:
    assert report.candidate is not None and report.champion is not None  # noqa: S101, PT018
    ours, theirs = report.candidate.metrics, report.champion.metrics
    version = f"v{report.champion.version}"
    if missing := report.champion.missing_features:
        why = (
            f"schema change: {version} needs features {missing} that the new data lacks, "
            f"so it was not scored on the candidate's rows; gate.on_schema_change is "
            f"{gate.on_schema_change}"
        )
        if gate.on_schema_change == "thresholds_only":
            return [Rule(True, f"{why}: value thresholds only")]
        return [Rule(False, f"{why}: the champion is kept; `retrain promote` serves the candidate")]
    primary = gate.primary_metric
    if primary not in ours or primary not in theirs:
        return [Rule(False, f"{primary} is missing for the candidate or {version}")]
    sign = -1.0 if primary in LOWER_IS_BETTER else 1.0
    gain = sign * (ours[primary] - theirs[primary])
    wanted = gate.min_improvement
    if wanted.relative is not None:
        required = wanted.relative * abs(theirs[primary])
        how = f"{wanted.relative:.1%} of {theirs[primary]:.3f}"
    else:
        required = wanted.absolute or 0.0
        how = "absolute"
    if gain <= 0 and required <= 0:
        rules = [Rule(False, f"no improvement over {version}: {primary} {gain:+.4f}")]
    else:
        rules = [
            Rule(
                gain > 0 and gain >= required,
                f"{primary} improvement over {version} {gain:+.4f} >= required "
                f"{required:+.4f} ({how})",
            )
        ]
    for metric, allowed in gate.max_regression.items():
        if metric not in ours or metric not in theirs:
            rules.append(Rule(False, f"{metric} is missing for the candidate or {version}"))
            continue
        worse = -1.0 if metric in LOWER_IS_BETTER else 1.0
        drop = worse * (theirs[metric] - ours[metric])
        rules.append(
            Rule(
                drop <= allowed,
                f"{metric} regression vs {version} {drop:+.4f} <= max {allowed:.4f}",
            )
        )
    return rules


def stale(report: MetricsReport, now: Pointer) -> str | None:
    """Why the champion that ``report`` was evaluated against is no longer the champion, or
    None. By the pointer's generation where the report carries it: a champion that moved
    away and back (a rollback) has moved, even if the version is the same again."""
    compared = report.champion.version if report.champion else None
    seen = report.champion.generation if report.champion else None
    if compared == now.version and (seen is None or seen == now.generation):
        return None
    then = f"v{compared}" if compared else "no champion"
    if seen is not None:
        then += f" (pointer generation {seen})"
    current = f"v{now.version}" if now.version else "none"
    return (
        f"stale: evaluated against {then}, but the champion is now {current} "
        f"(pointer generation {now.generation})"
    )


def decide(report: MetricsReport, gate: Gate, now: Pointer) -> Verdict:
    """Apply ``gate`` to ``report``; ``now`` is the champion pointer at this moment."""
    if report.status == "failed":
        step = report.failed_step or "a step"
        return Verdict(False, (Rule(False, f"the run failed in {step}: {report.error}"),))
    rules = _value_rules(report, gate)
    if report.champion is None:
        rules.append(Rule(True, "first version: value thresholds only"))
    else:
        rules.extend(_change_rules(report, gate))
    if (why := stale(report, now)) is not None:
        rules.append(Rule(False, why))
    return Verdict(all(rule.passed for rule in rules), tuple(rules))
