"""One test per finding of issue 12 about arrivals, on the real emulators: an arrival is
checked once however it is delivered, a missing object starts nothing, the champion cache
survives a promotion under a reader, the window counts rows, and the sweep finds objects
whose notification was lost."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from components.train import train
from retrain import blobstore
from retrain.config import Drift, TrainingWindow, Validation
from retrain.data_objects import data_window
from retrain.drift import check_degradation
from retrain.events import ObjectEvent
from retrain.messages import RetrainRequest
from retrain.service import UNSETTLED_SECONDS
from tests.conftest import rainfall
from tests.reliability.races import race
from tests.reliability.world import World

pytestmark = pytest.mark.integration

RAINFALL = rainfall(3600)
ALWAYS_DRIFTS = Drift(psi_threshold=1e-9, ks_pvalue=0.999, min_drifted_features=1)


def put(world: World, name: str, frame: pd.DataFrame) -> ObjectEvent:
    """Write ``frame`` under the world's prefix; the event its notification would carry."""
    bucket = world.settings.buckets.data
    blob = world.gcs.bucket(bucket).blob(f"{world.model}/{name}")
    blob.upload_from_string(frame.to_csv(index=False))
    blob.reload()
    return ObjectEvent(f"e-{name}", "OBJECT_FINALIZE", bucket, blob.name, str(blob.generation))


def request_of(world: World, event: ObjectEvent) -> RetrainRequest:
    """The request that ``event``'s arrival claims."""
    return RetrainRequest(model=world.model, reason="data", data_uris=[event.uri],
                          dedupe_key=event.dedupe_key, trigger_event_id=event.event_id)  # fmt: skip


def recorded(world: World, event: ObjectEvent, rows: int) -> None:
    """The arrival of ``event`` recorded as checked (``rows``), and nothing more done."""
    world.ledger.record_arrival(request_of(world, event), rows=rows)


def champion(world: World, tmp_path: Path, rows: pd.DataFrame) -> str:
    """A real model trained on ``rows``, registered and made champion; its version."""
    spec = world.settings.models[world.model]
    prepared = tmp_path / "train.parquet"
    rows.to_parquet(prepared, index=False)
    model_dir = train(prepared, spec, tmp_path / f"model-{len(list(tmp_path.iterdir()))}")
    uri = f"gs://{world.settings.buckets.models}/{world.model}/{model_dir.model_path.parent.name}"
    blobstore.upload_dir(model_dir.model_path.parent, uri, world.gcs)
    run_id = f"run-{uri.rsplit('/', 1)[-1]}"
    version = world.registry.register(world.model, {"run_id": run_id, "artifact_uri": uri,
                                                    "metrics": {"roc_auc": 0.8}})  # fmt: skip
    generation = world.registry.pointer(world.model).generation
    assert world.registry.promote(world.model, version, generation, "test", "a champion")
    return version


@pytest.fixture
def drifting(make_world: Callable[..., World]) -> World:
    return make_world(arrival_policy="on_drift_or_degradation", drift=ALWAYS_DRIFTS)


def test_2_a_notification_for_an_object_that_does_not_exist_starts_nothing(
    make_world: Callable[..., World],
) -> None:
    world = make_world()  # no champion yet: before, this arrival was queued and run
    bucket = world.settings.buckets.data
    ghost = ObjectEvent("e-ghost", "OBJECT_FINALIZE", bucket, f"{world.model}/gone.csv", "7")

    outcome = world.service.data_arrival(ghost)

    assert outcome.action == "ignored", outcome
    assert "no longer exists" in outcome.detail
    assert not world.launcher.jobs
    assert not world.ledger.has_pending(world.model)
    assert world.service.data_arrival(ghost).action == "duplicate"


def test_6_duplicates_racing_the_first_drift_check_settle_it_once(
    drifting: World, tmp_path: Path
) -> None:
    """Before, the second delivery checked again and answered 500 when it settled."""
    champion(drifting, tmp_path, RAINFALL.iloc[:2400])
    for i in range(5):
        event = put(drifting, f"chunk-{i}.csv", RAINFALL.iloc[2400 + 200 * i : 2600 + 200 * i])

        outcomes = race(*[lambda e=event: drifting.service.data_arrival(e)] * 4)

        assert all(o.action in ("checked", "duplicate") for o in outcomes), outcomes
        arrival = drifting.ledger.arrival(drifting.model, event.dedupe_key)
        assert arrival is not None
        assert arrival["outcome"] == "drift"
        assert drifting.ledger.event(drifting.model, arrival["alert_key"]) is not None
    assert len(drifting.inbox.published) == 5  # one alert per arrival, not per delivery


def test_6_a_promotion_under_a_reader_leaves_the_reader_its_champion(
    drifting: World, tmp_path: Path
) -> None:
    """Before, the cache deleted the replaced champion's folder while another thread was
    about to load its model.joblib from it."""
    champion(drifting, tmp_path, RAINFALL.iloc[:2400])
    first = drifting.registry.champion(drifting.model)
    assert first is not None
    metadata, estimator, metrics = drifting.service._champion(drifting.model, first)
    champion(drifting, tmp_path, RAINFALL.iloc[1200:3600])  # promoted meanwhile
    second = drifting.registry.champion(drifting.model)
    assert second is not None
    assert second.version != first.version

    drifting.service._champion(drifting.model, second)  # another arrival sees the new one

    report = check_degradation(RAINFALL.iloc[3000:], estimator, metadata, metrics, 0.05)
    assert report is not None
    assert report.rows == 600


def test_8_the_data_window_counts_rows_not_objects(make_world: Callable[..., World]) -> None:
    """1,200 rows as 4-row objects: before, the window took the newest 200 objects (800
    rows) and every run failed too_few_rows."""
    world = make_world(training_window=TrainingWindow(rows=1000),
                       validation=Validation(min_object_rows=1))  # fmt: skip
    for i in range(300):
        event = put(world, f"tiny-{i:03d}.csv", RAINFALL.iloc[4 * i : 4 * i + 4])
        recorded(world, event, rows=4)

    window = data_window(world.settings, world.model, [], world.gcs, world.ledger)

    assert len(window) == 250  # 1,000 rows
    assert window[-1].endswith("tiny-299.csv")


def test_8_the_window_leaves_out_quarantined_objects(make_world: Callable[..., World]) -> None:
    world = make_world()
    good = put(world, "good.csv", RAINFALL.iloc[:600])
    bad = put(world, "bad.csv", RAINFALL.iloc[600:1200].drop(columns=["rain"]))
    assert world.service.data_arrival(good).action == "launched"
    assert world.service.data_arrival(bad).action == "quarantined"

    window = data_window(world.settings, world.model, [], world.gcs, world.ledger)

    assert window == [good.uri]


def test_the_sweep_checks_an_object_whose_notification_was_lost(
    make_world: Callable[..., World],
) -> None:
    world = make_world(arrival_policy="every_arrival")
    lost = put(world, "lost.csv", RAINFALL.iloc[:600])  # no notification is delivered

    world.service.sweep()

    arrival = world.ledger.arrival(world.model, lost.dedupe_key)
    assert arrival is not None
    assert arrival["outcome"] == "accepted"
    assert arrival["rows"] == 600
    assert len(world.launcher.jobs) == 1
    world.service.sweep()
    assert len(world.launcher.jobs) == 1, "checked once"


def test_the_sweep_finishes_a_check_whose_deliveries_gave_up(
    make_world: Callable[..., World],
) -> None:
    """The check recorded the object, then died before claiming its run, and Pub/Sub gave up
    on the notification: the sweep finishes it, once it is old enough."""
    world = make_world(arrival_policy="every_arrival")
    event = put(world, "half.csv", RAINFALL.iloc[:600])
    recorded(world, event, rows=600)

    world.service.sweep()
    assert not world.launcher.jobs, "a check in progress is left alone"
    world.now += UNSETTLED_SECONDS + 1
    world.service.sweep()

    assert len(world.launcher.jobs) == 1
    arrival = world.ledger.arrival(world.model, event.dedupe_key)
    assert arrival is not None
    assert arrival["outcome"] == "accepted"


def test_an_arrival_notified_with_its_size_is_read_in_one_request(
    make_world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GCS's notification gives the object's size: the check reads the pinned generation
    at once, without asking for its metadata first; a notified size that is wrong goes the
    way of an unsized one, and a generation that is gone is ignored either way."""
    from google.cloud.storage.bucket import Bucket  # noqa: PLC0415

    world = make_world(arrival_policy="every_arrival")
    asked: list[str] = []
    get_blob = Bucket.get_blob

    def counted(bucket: Bucket, name: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(name)
        return get_blob(bucket, name, *args, **kwargs)

    monkeypatch.setattr(Bucket, "get_blob", counted)
    rows = RAINFALL.iloc[:600]
    sized = put(world, "sized.csv", rows)
    size = len(rows.to_csv(index=False).encode())

    outcome = world.service.data_arrival(dataclasses.replace(sized, size=size))

    assert outcome.action == "launched", outcome
    assert asked == [], "the metadata was asked for"
    arrival = world.ledger.arrival(world.model, sized.dedupe_key)
    assert arrival is not None
    assert (arrival["rows"], arrival["bytes"], arrival["outcome"]) == (600, size, "accepted")

    for i, wrong in enumerate((size - 10, size + 10, 1)):  # understated, overstated, tiny
        other = put(world, f"wrong-{i}.csv", rows)
        world.service.data_arrival(dataclasses.replace(other, size=wrong))
        arrival = world.ledger.arrival(world.model, other.dedupe_key)
        assert arrival is not None
        assert (arrival["rows"], arrival["bytes"]) == (600, size), wrong
    assert asked == [f"{world.model}/wrong-{i}.csv" for i in range(3)]

    gone = put(world, "gone.csv", rows)
    world.gcs.bucket(gone.bucket).blob(gone.name).delete()
    outcome = world.service.data_arrival(dataclasses.replace(gone, size=size))
    assert outcome.action == "ignored", outcome
    assert "no longer exists" in outcome.detail


def test_an_arrival_behind_a_held_lease_is_recorded_settled_and_claimed_in_one_commit(
    make_world: Callable[..., World],
) -> None:
    """While a run holds the lease, an arrival's first delivery makes one commit: its
    record (settled), its claim, and a check that the lease is as read, which leaves the
    model's document untouched (its update time too: nothing racing it has to retry)."""
    world = make_world(arrival_policy="every_arrival")
    assert world.ledger.acquire(world.model, "holder", ttl=600).acquired
    head = world.db.read_path("ledger", world.model)
    event = put(world, "queued.csv", RAINFALL.iloc[:600])
    writes = len(world.faults.log)

    outcome = world.service.data_arrival(event)

    assert (outcome.action, outcome.detail) == ("queued", "run holder is in flight"), outcome
    assert world.faults.log[writes:] == ["commit arrivals, events, ledger"]
    after = world.db.read_path("ledger", world.model)
    assert (after.data, after.update_time) == (head.data, head.update_time)
    arrival = world.ledger.arrival(world.model, event.dedupe_key)
    assert arrival is not None
    assert (arrival["outcome"], arrival["rows"]) == ("accepted", 600)
    assert [r.dedupe_key for r in world.ledger.pending(world.model)] == [event.dedupe_key]
    assert world.service.data_arrival(event).action == "duplicate"


def test_a_lease_that_moved_after_the_read_fails_the_one_commit_and_writes_nothing(
    make_world: Callable[..., World],
) -> None:
    """The lease is released between the read and the commit: the commit fails as a whole
    (no record, no claim), and the arrival takes the general path, which starts a run."""
    world = make_world(arrival_policy="every_arrival")
    assert world.ledger.acquire(world.model, "holder", ttl=600).acquired
    event = put(world, "moved.csv", RAINFALL.iloc[:600])
    head = world.db.read_path("ledger", world.model)
    world.ledger.finish(world.model, "holder", "succeeded")

    held = world.ledger.queue_arrival(request_of(world, event), head, "accepted", rows=600)

    assert held is None
    assert world.ledger.arrival(world.model, event.dedupe_key) is None
    assert world.ledger.event(world.model, event.dedupe_key) is None

    # Through the service: the same move between its read and its commit.
    assert world.ledger.acquire(world.model, "holder-2", ttl=600).acquired
    read = world.ledger.arrival_and_head

    def released_after_the_read(model: str, key: str) -> Any:
        found = read(model, key)
        world.ledger.finish(model, "holder-2", "succeeded")
        return found

    world.ledger.arrival_and_head = released_after_the_read  # type: ignore[method-assign,assignment]
    writes = len(world.faults.log)

    outcome = world.service.data_arrival(event)

    assert outcome.action == "launched", outcome
    log = world.faults.log[writes:]
    assert log[:2] == ["commit ledger, runs", "commit arrivals, events"], log  # finish; claim
    arrival = world.ledger.arrival(world.model, event.dedupe_key)
    assert arrival is not None
    assert (arrival["outcome"], arrival["run_id"]) == ("accepted", outcome.run_id)
