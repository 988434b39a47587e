"""A world in which to crash and race the real protocol, and the invariants it must keep.

Real: the ledger, the registry, the gatekeeper and the service (``RetrainService``), on the
Firestore emulator and fake-gcs-server of the session's local stack; the launcher helpers
(``pipelines.launch``: gather, hold, record) and the run's report (``components.runs``).
Simulated, because they are processes and clouds we do not want to start thousands of
times: the pipeline jobs (:class:`SimLauncher`, with the ``PipelineLauncher`` port's
semantics: one job per run name, a state per job) and Pub/Sub (:class:`Inbox`, which
redelivers whatever a handler did not finish, as a push subscription does).

Every effect on the outside world goes through :class:`Faults`: each Firestore commit,
each publish, each job submission, each object written or copied. A world built with
``Faults(crash_at=k)`` dies (raises :class:`Crash`, which no code of ours catches) right
after its k-th write, once; the messages being handled are then redelivered, the sweep
runs, and the world goes on until it is quiet. :func:`check` states the invariants.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from components.runs import RunContext, failure_report, publish_report
from pipelines.launch import JobState, gather_or_end, hold_for_run, record_launch
from retrain import blobstore
from retrain.config import Settings
from retrain.events import ObjectEvent
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger, RunRecord
from retrain.messages import EvaluatedModel, Message, MetricsReport, RetrainRequest
from retrain.service import RetrainService
from retrain.statedb import Change, Database

T = TypeVar("T")


class Crash(BaseException):
    """The process died here (a BaseException: no ``except Exception`` of ours stops it)."""


# The faults of the world that the current thread runs (worlds may run side by side).
ROUTE = threading.local()


class Faults:
    """Counts the world's writes, and crashes right after the ``crash_at``-th (once)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.writes = 0
        self.crashed: str | None = None
        self.log: list[str] = []
        self._lock = threading.Lock()

    def write(self, what: str, apply: Callable[[], T]) -> T:
        result = apply()
        with self._lock:
            self.writes += 1
            self.log.append(what)
            crash = self.writes == self.crash_at
            if crash:
                self.crashed = f"after write {self.writes}: {what}"
        if crash:
            raise Crash(self.crashed)
        return result


class CrashingDatabase(Database):
    """The real database whose every commit is a write the faults may crash after."""

    def __init__(self, client: Any, faults: Faults) -> None:
        super().__init__(client)
        self.faults = faults

    def commit(self, change: Change) -> list[Any]:
        if not change:
            return []
        what = "commit " + ", ".join(
            sorted({d.ref.path.split("/")[-2] for _, d, _ in change.writes})
        )
        return self.faults.write(what, lambda: Database.commit(self, change))


@dataclass
class Delivery:
    kind: Literal["event", "arrival", "report"]
    payload: Any
    attempts: int = 0


class Inbox:
    """Pub/Sub, in memory: what is published waits to be delivered; a delivery whose
    handler did not return is delivered again (a push subscription's retry)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.queue: list[Delivery] = []
        self.published: list[tuple[str, Message]] = []
        self.lost: set[str] = set()  # run ids whose reports are lost on the way
        self._lock = threading.Lock()

    def publish(self, topic: str, message: Message, **attributes: str) -> str:
        del attributes

        def apply() -> str:
            with self._lock:
                self.published.append((topic, message))
                if isinstance(message, MetricsReport) and message.run_id not in self.lost:
                    self.queue.append(Delivery("report", message))
                return str(len(self.published))

        return self.faults.write(f"publish {type(message).__name__}", apply)


@dataclass
class Job:
    model: str
    run_id: str
    state: Literal["running", "ended"] = "running"


class SimLauncher:
    """The ``PipelineLauncher`` port with simulated jobs, through the real launch helpers.

    ``fail_submits``: this many submits fail (an API error) before the job is created.
    ``overlaps`` records every moment two jobs of one model ran at once (invariant b)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.jobs: dict[str, Job] = {}
        self.fail_submits = 0
        self.overlaps: list[str] = []
        self.by_schedule: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def submit(self, model: str, run_id: str) -> None:
        world = self.world
        inputs = gather_or_end(world.settings, world.ledger, model, run_id)
        if inputs is None:
            return
        ttl = world.settings.models[model].lease_seconds
        if not hold_for_run(world.ledger, model, run_id, ttl):
            return
        if self.fail_submits:
            self.fail_submits -= 1
            raise RuntimeError("503 the pipelines API is unavailable")
        world.faults.write(f"submit job of {run_id}", lambda: self._create(model, run_id))
        record_launch(world.ledger, model, run_id, f"sim/{run_id}")

    def _create(self, model: str, run_id: str) -> None:
        with self._lock:
            if run_id in self.jobs:
                return  # the job of this run exists: a retried submit (a 409)
            running = [j.run_id for j in self.jobs.values() if j.model == model
                       and j.state == "running"]  # fmt: skip
            if running:
                self.overlaps.append(f"{run_id} started while {running} ran")
            self.jobs[run_id] = Job(model, run_id)

    def state(self, model: str, run: RunRecord) -> JobState:
        del model
        job = self.jobs.get(run.run_id)
        return "absent" if job is None else job.state

    def scheduled(self, model: str, run_id: str) -> bool:
        """Jobs that the model's pipeline schedule started (``schedule_job``)."""
        return run_id in self.by_schedule.get(model, set())

    def schedule_job(self, model: str, run_id: str) -> None:
        """A pipeline schedule starts a job outside the ledger."""
        self.by_schedule.setdefault(model, set()).add(run_id)
        self.jobs[run_id] = Job(model, run_id)

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == "running"]


@dataclass
class Plan:
    """How the simulated pipelines end: roc_auc per run (in submit order), and runs whose
    pipeline dies without a report, fails, or whose report message is lost."""

    scores: list[float] = field(default_factory=lambda: [0.80, 0.85, 0.83, 0.90, 0.88, 0.95])
    die: set[int] = field(default_factory=set)  # by the job's submit order, from 0
    fail: set[int] = field(default_factory=set)
    lose_report: set[int] = field(default_factory=set)


class World:
    """One model in one world (a fresh model name, so worlds never see each other)."""

    def __init__(self, base: Settings, client: Any, gcs: Any, faults: Faults | None = None,
                 plan: Plan | None = None, lease_seconds: float = 600.0,
                 **changes: Any) -> None:  # fmt: skip
        """``changes``: to the model's settings (the shipped rainfall model's), as objects."""
        self.model = f"m-{uuid.uuid4().hex[:12]}"
        spec = base.models["rainfall"].model_copy(
            update={
                "data_prefix": f"{self.model}/",
                "coalesce_seconds": 0.0,
                "lease_seconds": lease_seconds,
                "schedule": None,
                **changes,
            }
        )
        # Buckets of its own: fake-gcs-server lists a prefix by walking the whole bucket,
        # and thousands of worlds' runs in one bucket would slow every world down.
        buckets = base.buckets.model_copy(
            update={"artifacts": f"{self.model}-art", "registry": f"{self.model}-reg"}
        )
        for bucket in (buckets.artifacts, buckets.models):
            gcs.create_bucket(bucket)
        self.settings = base.model_copy(update={"models": {self.model: spec}, "buckets": buckets})
        self.faults = faults or Faults()
        ROUTE.faults = self.faults
        self.plan = plan or Plan()
        self.now = 1_000_000.0
        self.db = CrashingDatabase(client, self.faults)
        self.gcs = gcs
        self.ledger = FirestoreLedger(self.db, clock=lambda: self.now)
        self.registry = FirestoreRegistry(self.db, self.settings.buckets.models, gcs)
        self.inbox = Inbox(self.faults)
        self.launcher = SimLauncher(self)
        self.service = RetrainService(
            self.settings, self.ledger, self.launcher, self.inbox, self.registry, storage=gcs
        )
        self.events: list[RetrainRequest] = []
        self.arrivals: list[ObjectEvent] = []  # objects that landed (``arrival``)
        self.submitted: list[str] = []  # run ids, in the order their jobs were created

    # -- what happens in the world -------------------------------------------------

    def event(self, i: int) -> RetrainRequest:
        """Data object number ``i`` lands: its notification is queued for delivery."""
        bucket, prefix = self.settings.buckets.data, f"{self.model}/"
        request = RetrainRequest(
            model=self.model, reason="data", data_uris=[f"gs://{bucket}/{prefix}obj-{i}.csv"],
            dedupe_key=f"{bucket}/{prefix}obj-{i}.csv#1", trigger_event_id=f"e-{i}",
        )  # fmt: skip
        self.events.append(request)
        self.inbox.queue.append(Delivery("event", request))
        return request

    def arrival(self, i: int) -> ObjectEvent:
        """Data object number ``i`` lands in the data bucket (100 real rows): its GCS
        notification is queued for delivery to the arrival check (``data_arrival``)."""
        from tests.conftest import rainfall  # noqa: PLC0415 (pandas, for these worlds only)

        bucket = self.settings.buckets.data
        blob = self.gcs.bucket(bucket).blob(f"{self.model}/obj-{i}.csv")
        data = rainfall(100 * i).iloc[-100:].to_csv(index=False).encode()
        blob.upload_from_string(data)
        event = ObjectEvent(f"e-{i}", "OBJECT_FINALIZE", bucket, blob.name, str(blob.generation),
                            size=len(data))  # as GCS notifies it  # fmt: skip
        self.events.append(RetrainRequest(
            model=self.model, reason="data", data_uris=[event.uri],
            dedupe_key=event.dedupe_key, trigger_event_id=event.event_id,
        ))  # fmt: skip
        self.arrivals.append(event)
        self.inbox.queue.append(Delivery("arrival", event))
        return event

    def deliver(self, delivery: Delivery) -> None:
        delivery.attempts += 1
        if delivery.kind == "event":
            self.service.request(delivery.payload)
        elif delivery.kind == "arrival":
            self.service.data_arrival(delivery.payload)
        else:
            self.service.report(delivery.payload)

    def finish_job(self, job: Job) -> None:
        """The job's pipeline ends as the plan says: it keeps and publishes its report (or
        a failure report), or dies without one."""
        order = list(self.launcher.jobs).index(job.run_id)
        job.state = "ended"
        if order in self.plan.die:
            return
        record = self.ledger.run(job.model, job.run_id)
        run = RunContext.parse(job.model, job.run_id, (record.request_id if record else "")
                               or job.run_id, "data")  # fmt: skip
        if order in self.plan.lose_report:
            self.inbox.lost.add(job.run_id)
        if order in self.plan.fail:
            failure_report(self.settings, run, "FAILED", "boom", self.inbox)
            return
        champion = self.registry.champion(job.model)
        prefix = self.settings.run_prefix(job.model, job.run_id)
        score = self.plan.scores[order % len(self.plan.scores)]
        blobstore.write_bytes(f"{prefix}/model/model.joblib", b"model " + job.run_id.encode(),
                              self.gcs)  # fmt: skip
        report = MetricsReport(
            model=job.model, run_id=job.run_id, request_id=run.request_id, reason="data",
            status="succeeded",
            candidate=EvaluatedModel(artifact_uri=f"{prefix}/model",
                                     metrics={"roc_auc": score, "accuracy": 0.8, "rows": 600.0}),
            champion=None if champion is None else EvaluatedModel(
                artifact_uri=champion.artifact_uri, version=champion.version,
                generation=champion.generation,
                metrics={"roc_auc": champion.metrics.get("roc_auc", 0.0), "accuracy": 0.8,
                         "rows": 600.0}),
        )  # fmt: skip
        publish_report(self.settings, run, report, self.inbox)

    def sweep(self, advance: float | None = None) -> None:
        """Time passes (by default past every lease), then the sweep runs."""
        self.now += self.settings.models[self.model].lease_seconds + 1 if advance is None \
            else advance  # fmt: skip
        self.service.sweep()

    def step(self) -> bool:
        """Deliver one message, or end one job; False if there was nothing to do."""
        if self.inbox.queue:
            delivery = self.inbox.queue.pop(0)
            try:
                self.deliver(delivery)
            except (Crash, Exception):  # noqa: BLE001 (any failure is redelivered)
                self.inbox.queue.append(delivery)  # redelivered, as Pub/Sub does
            return True
        running = self.launcher.running()
        if running:
            try:
                self.finish_job(running[0])
            except (Crash, Exception):  # noqa: BLE001 (the job died while reporting)
                running[0].state = "ended"
            return True
        return False

    def settle(self, max_steps: int = 400) -> None:
        """Run until quiet: deliver, end jobs, and sweep until the sweep finds nothing."""
        for _ in range(max_steps):
            if self.step():
                continue
            before = (len(self.launcher.jobs), len(self.inbox.published))
            try:
                self.sweep()
            except (Crash, Exception):  # noqa: BLE001, S112 (the next tick goes on)
                continue
            if (len(self.launcher.jobs), len(self.inbox.published)) == before and not (
                self.inbox.queue or self.ledger.lease(self.model)
                or self.ledger.has_pending(self.model)
            ):  # fmt: skip
                return
        raise AssertionError(f"{self.model} did not settle in {max_steps} steps")


@contextmanager
def counted_storage(faults: Faults) -> Iterator[None]:
    """Count the objects written or copied (reports, models) as writes of ``faults``."""
    write, copy = blobstore.write_bytes, blobstore.copy_prefix

    def counted_write(*args: Any, **kwargs: Any) -> int:
        return faults.write(f"write {args[0]}", lambda: write(*args, **kwargs))

    def counted_copy(*args: Any, **kwargs: Any) -> list[str]:
        return faults.write(f"copy {args[0]}", lambda: copy(*args, **kwargs))

    blobstore.write_bytes, blobstore.copy_prefix = counted_write, counted_copy
    try:
        yield
    finally:
        blobstore.write_bytes, blobstore.copy_prefix = write, copy


# -- the invariants ---------------------------------------------------------------------


def check(world: World, *, quiet: bool = True) -> None:
    """The invariants of docs/reliability.md; ``quiet``: also those that hold at
    quiescence only (no event waits, no lease held, nothing undecided)."""
    model, ledger, registry = world.model, world.ledger, world.registry
    runs = {r.run_id: r for r in ledger.runs(model)}
    decisions = {d["decision"]["run_id"]: d for d in registry.decisions(model)}
    # (b) single flight
    assert world.launcher.overlaps == [], world.launcher.overlaps
    # (a) coverage: each event in exactly one run that kept it, which decided (at quiescence)
    events = {e.get("request", {}).get("dedupe_key"): e for e in
              (d.data or {} for d in ledger.db.all(ledger.db.client.collection(
                  "ledger", model, "events")))}  # fmt: skip
    requeued = set(world.db.read_path("ledger", model).get("requeued", []))
    keeps: dict[str, list[str]] = {}
    for run in runs.values():
        gave_back = run.state == "abandoned" or (decisions.get(run.run_id) or {}).get("requeued")
        if not gave_back:
            for entry in run.events:
                keeps.setdefault(entry["dedupe_key"], []).append(run.run_id)
    for key, claim in events.items():
        holder = claim.get("run_id")
        waiting = holder is None or holder in requeued
        kept = keeps.get(key, [])
        if waiting:
            assert not quiet, f"{key} still waits at quiescence"
            continue
        assert kept == [holder], f"{key} is covered by {holder} but kept by {kept}"
        if quiet:
            assert holder in decisions, f"{key}: its run {holder} reached no decision"
    assert set(keeps) <= set(events), f"runs keep unclaimed events: {set(keeps) - set(events)}"
    # every event the world sent was claimed
    if quiet:
        missing = {e.dedupe_key for e in world.events} - set(events)
        assert not missing, f"events never claimed: {missing}"
    # (c) decisions agree with the pointer, and (d) versions
    records = registry.records(model)
    numbers = [int(r["number"]) for r in records]
    assert numbers == list(range(1, len(records) + 1)), f"version numbers {numbers}"
    assert len({r["run_id"] for r in records}) == len(records), "a run has two versions"
    stamps = [r["registered_at"] for r in records]
    assert stamps == sorted(stamps), "versions not in registration order"
    audit = registry.audit(model)
    promoted_by_gate = {a["to"] for a in audit if a.get("by") == "gatekeeper"}
    ever_champion = {a["to"] for a in audit}
    verdict_promoted = {r["version"] for r in records if r.get("verdict") == "promoted"}
    # The gatekeeper moved the pointer to exactly the versions it promoted, and to none it
    # rejected; a version recorded promoted was made champion (by the gatekeeper, or by an
    # operator before the gate decided: the decision follows the pointer).
    assert promoted_by_gate <= verdict_promoted, (promoted_by_gate, verdict_promoted)
    assert verdict_promoted <= ever_champion, (verdict_promoted, ever_champion)
    by_run = {r["run_id"]: r["version"] for r in records}
    for run_id, kept_decision in decisions.items():
        decision = kept_decision["decision"]
        assert decision["new_version"] == by_run.get(run_id), (run_id, decision)
        if decision["new_version"]:
            version = next(r for r in records if r["version"] == decision["new_version"])
            assert version.get("verdict") == decision["verdict"], (run_id, version, decision)
    head = world.db.read_path("registry", model)
    if head.get("champion") is not None:
        moved_to = [a["to"] for a in registry.audit(model)]
        assert moved_to, head.data
        assert moved_to[-1] == head.get("champion"), (moved_to, head.data)
        assert int(head.get("generation")) == len(moved_to)
    if quiet:
        assert all(r.get("verdict") for r in records), "a version without a decision"
        # (e) nothing held, every run ended, nothing waits
        assert ledger.lease(model) is None, f"lease still held: {ledger.lease(model)}"
        assert not ledger.has_pending(model)
        assert all(r.ended_at is not None for r in runs.values()), [
            (r.run_id, r.state) for r in runs.values() if r.ended_at is None
        ]
        assert all(j.state == "ended" for j in world.launcher.jobs.values())
        # every arrival checked once and settled, as an accepted one (its run covers it)
        for event in world.arrivals:
            arrival = ledger.arrival(model, event.dedupe_key)
            assert arrival is not None, f"{event.uri}: its arrival was never recorded"
            assert arrival.get("outcome") == "accepted", (event.uri, arrival.get("outcome"))


def a_run_is_coming(world: World) -> None:
    """Right after a race, before any sweep: events that wait have a run to come, from the
    lease's holder (it collects them, or its trailing run does) or from a delivery still to
    be made. The sweep would start a run for any other, but only minutes later."""
    model = world.model
    if world.inbox.queue or world.ledger.lease(model) is not None:
        return
    waiting = [r.dedupe_key for r in world.ledger.pending(model)]
    assert not waiting, f"{waiting} wait, with no lease held and nothing to deliver"


def replay(world: World) -> None:
    """(f): every event and every report delivered again changes nothing."""
    model = world.model
    before = (
        [d["decision"] for d in world.registry.decisions(model)],
        world.registry.records(model),
        world.db.read_path("registry", model).data,
        len(world.launcher.jobs),
    )
    for request in world.events:
        assert world.service.request(request).action == "duplicate", request.dedupe_key
    for event in world.arrivals:
        assert world.service.data_arrival(event).action == "duplicate", event.uri
    for topic, message in list(world.inbox.published):
        if isinstance(message, MetricsReport):
            world.service.report(message)
        del topic
    after = (
        [d["decision"] for d in world.registry.decisions(model)],
        world.registry.records(model),
        world.db.read_path("registry", model).data,
        len(world.launcher.jobs),
    )
    assert after == before, "a replay changed something"
