"""The topology derived from retrain.yaml: names, routes and delivery policy."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from retrain.config import load_settings
from retrain.messages import ScheduleMessage, decode
from retrain.scheduler import CronJob, SweepJob, jobs, schedule_message
from retrain.topology import push_subscription, topology

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parents[2] / "retrain.yaml"


def test_every_topic_has_a_dead_letter_topic_and_a_subscription_on_it() -> None:
    plan = topology(load_settings(SHIPPED))
    assert set(plan.topics) == {
        "data-arrivals",
        "drift-alerts",
        "retrain-schedule",
        "model-metrics",
        "model-decisions",
    }
    for topic in plan.topics:
        assert f"{topic}-dead-letter" in plan.all_topics
        assert plan.pulls[f"{topic}-dead-letter"] == f"{topic}-dead-letter"
    assert plan.pulls["model-decisions-watch"] == "model-decisions"
    assert plan.pulls["model-decisions-serving"] == "model-decisions"


def test_each_function_gets_one_push_route_from_its_topic() -> None:
    plan = topology(load_settings(SHIPPED))
    routes = {route.function: route.topic for route in plan.pushes}
    assert routes == {
        "on_data_arrival": "data-arrivals",
        "on_drift": "drift-alerts",
        "on_schedule": "retrain-schedule",
        "gatekeeper": "model-metrics",
    }


def test_push_subscription_carries_dead_letter_and_retry_policy() -> None:
    settings = load_settings(SHIPPED)
    route = topology(settings).pushes[0]
    sub = push_subscription("p-roject", route, "http://127.0.0.1:1/x", settings.delivery)
    assert sub.name == "projects/p-roject/subscriptions/data-arrivals-on-data-arrival"
    assert (
        sub.dead_letter_policy.dead_letter_topic
        == "projects/p-roject/topics/data-arrivals-dead-letter"
    )
    assert sub.dead_letter_policy.max_delivery_attempts == 5
    assert sub.retry_policy.minimum_backoff.total_seconds() == 1
    assert sub.retry_policy.maximum_backoff.total_seconds() == 10
    assert sub.ack_deadline_seconds == 60
    local = push_subscription("p-roject", route, "http://x", settings.delivery, retry_policy=False)
    assert "retry_policy" not in local
    assert local.dead_letter_policy == sub.dead_letter_policy


def test_scheduler_fires_on_each_models_cron() -> None:
    settings = load_settings(SHIPPED)
    cron, _ = jobs(settings, datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    assert isinstance(cron, CronJob)
    assert cron.model == "rainfall"
    assert cron.next == datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    assert cron.advance() == datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    assert cron.next == datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
    assert schedule_message("rainfall", cron.next) == (
        b'{"model": "rainfall", "scheduled_time": "2026-11-27T03:00:00+00:00"}'
    )


def test_scheduler_sweeps_every_sweep_seconds() -> None:
    """One sweep job for all models, every ``sweep_seconds`` (600 shipped), with or without
    any model's cron; its message is a sweep that the on_schedule function accepts."""
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    shipped = load_settings(SHIPPED)
    sweep = jobs(shipped, now)[-1]
    assert isinstance(sweep, SweepJob)
    assert sweep.model == "*"
    assert sweep.next == now + timedelta(seconds=600)
    assert sweep.advance() == now + timedelta(seconds=600)
    assert sweep.next == now + timedelta(seconds=1200)
    message = schedule_message(sweep.model, sweep.next)
    assert json.loads(message) == {"model": "*", "reason": "sweep"}
    assert decode(ScheduleMessage, message).reason == "sweep"

    quiet = shipped.model_copy(update={"sweep_seconds": 30, "models": {
        name: model.model_copy(update={"schedule": None})
        for name, model in shipped.models.items()}})  # fmt: skip
    (only,) = jobs(quiet, now)
    assert isinstance(only, SweepJob)
    assert only.next == now + timedelta(seconds=30)
