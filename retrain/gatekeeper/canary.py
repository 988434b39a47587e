"""The canary policy: does a canary complete, or roll back, on its live metric?

A candidate that passed the gate with ``gate.canary`` set serves ``percent`` % of the
traffic beside the previous champion (the champion pointer's ``canary``). Once the monitor
has at least ``min_labelled`` late-labelled canary predictions, it hands the live numbers
of both versions on the same window to :meth:`Gatekeeper.settle_canary
<retrain.gatekeeper.decisions.Gatekeeper.settle_canary>`, which asks :func:`judge`.

Every rule is listed with its numbers, as in :mod:`retrain.gatekeeper.policy`, so that the
Decision explains itself::

    live roc_auc v3 0.710 vs v2 0.800 on the same window: regression +0.0900 <= max 0.0200: FAIL

The canary completes if its live metric is at most ``max_regression`` worse than the
previous champion's (worse: lower, or higher for a lower-is-better metric such as
``log_loss``); otherwise it is rolled back. It is not judged yet (:func:`judge` returns
None) while it has fewer than ``min_labelled`` labelled predictions, while the previous
champion has none on the window, or while either metric is not a number (e.g. roc_auc of
labels of one class only): more labels settle it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from retrain.config import Canary
from retrain.gatekeeper.policy import LOWER_IS_BETTER, Rule, Verdict
from retrain.gatekeeper.registry import CanaryState

__all__ = ["LIVE_FIELDS", "judge", "live_of"]

# What the monitor reports per version, beside the metric itself.
LIVE_FIELDS = ("labelled", "served")


def live_of(
    live: Mapping[str, Mapping[str, float]], state: CanaryState, metric: str
) -> dict[str, dict[str, float]]:
    """The numbers of the canary and its previous champion that a Decision keeps: the
    metric, ``labelled`` and ``served`` of each (what the monitor gave, nothing else)."""
    kept: dict[str, dict[str, float]] = {}
    for version in (state.version, state.previous):
        given = live.get(version) or {}
        kept[version] = {
            key: float(given[key]) for key in (metric, *LIVE_FIELDS) if given.get(key) is not None
        }
    return kept


def judge(
    state: CanaryState,
    spec: Canary,
    primary_metric: str,
    live: Mapping[str, Mapping[str, float]],
) -> Verdict | None:
    """The verdict on ``state``'s canary from ``live`` (``{version: {<metric>: value,
    "labelled": n, "served": n}}``, the canary's and the previous champion's numbers on
    the same window): complete (``promote``) or roll back; None if it cannot be judged yet
    (see the module docstring). Raises ValueError naming the field if ``live`` lacks the
    metric of a version that has labelled predictions."""
    metric = spec.metric or primary_metric
    ours, theirs = live.get(state.version), live.get(state.previous)
    if ours is None or theirs is None:
        return None  # numbers of other versions (the canary changed meanwhile)
    labelled = float(ours.get("labelled", 0))
    previous_labelled = float(theirs.get("labelled", 0))
    if labelled < spec.min_labelled or previous_labelled <= 0:
        return None
    for version, given in ((state.version, ours), (state.previous, theirs)):
        if metric not in given:
            raise ValueError(
                f"live[{version!r}][{metric!r}]: missing; the live numbers of v{version} "
                f"have {sorted(given)} (gate.canary.metric is {metric})"
            )
    mine, previous = float(ours[metric]), float(theirs[metric])
    if not (math.isfinite(mine) and math.isfinite(previous)):
        return None
    worse = -1.0 if metric in LOWER_IS_BETTER else 1.0
    regression = worse * (previous - mine)
    canary, before = f"v{state.version}", f"v{state.previous}"
    rules = (
        Rule(
            True,
            f"canary {canary} served {state.percent}% of the traffic: "
            f"{labelled:.0f} labelled predictions >= min {spec.min_labelled}; "
            f"{before} {previous_labelled:.0f}",
        ),
        Rule(
            regression <= spec.max_regression,
            f"live {metric} {canary} {mine:.3f} vs {before} {previous:.3f} on the same window: "
            f"regression {regression:+.4f} <= max {spec.max_regression:.4f}",
        ),
    )
    return Verdict(all(rule.passed for rule in rules), rules)
