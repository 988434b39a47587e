"""The JSON messages on Pub/Sub, each with a ``schema_version`` (DESIGN.md, "Messages").

Parsing is strict: an unknown field, a wrong type or a missing field is a
:class:`MessageError` naming the message kind and the field, never a half-read message.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ALL_MODELS",
    "REPORT_FILE",
    "SCHEMA_VERSION",
    "Decision",
    "DriftAlert",
    "EvaluatedModel",
    "Message",
    "MessageError",
    "MetricsReport",
    "RetrainRequest",
    "ScheduleMessage",
    "decode",
    "encode",
]

SCHEMA_VERSION: Literal[1] = 1
MAX_MESSAGE_BYTES = 1_000_000
# Where a run keeps its MetricsReport, under its run prefix ({"report": ...}), before it
# publishes it: the pipeline writes it, the gatekeeper decides from it if the message is lost.
REPORT_FILE = "report.json"


def _now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class RetrainRequest(Message):
    model: str = Field(min_length=1)
    reason: Literal["data", "drift", "schedule", "manual"]
    data_uris: list[str] = Field(default_factory=list)
    dedupe_key: str = Field(min_length=1)
    trigger_event_id: str = Field(min_length=1)
    time: datetime = Field(default_factory=_now)


class EvaluatedModel(Message):
    """One model's metrics on the run's evaluation rows."""

    artifact_uri: str
    version: str | None = None
    metrics: dict[str, float]
    generation: int | None = Field(
        None,
        ge=0,
        description="For the champion: the champion pointer's generation when it was read "
        "(how many times it had moved); the gate finds the report stale if it moved since.",
    )
    missing_features: list[str] = Field(
        default_factory=list,
        description="For the champion: the features it needs that the evaluation rows lack "
        "(a schema change); it was not scored, and gate.on_schema_change decides.",
    )


class MetricsReport(Message):
    model: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    request_id: str = Field(min_length=1, description="The dedupe key of the RetrainRequest.")
    reason: Literal["data", "drift", "schedule", "manual"]
    status: Literal["succeeded", "failed"]
    error: str | None = None
    failed_step: str | None = None
    candidate: EvaluatedModel | None = None
    champion: EvaluatedModel | None = None
    eval_data_uris: list[str] = Field(default_factory=list)
    train_data_uris: list[str] = Field(default_factory=list)
    train_rows: dict[str, int] = Field(
        default_factory=dict, description="Rows read from each object, before the window."
    )
    window_rows: int | None = Field(
        None, ge=0, description="Rows in the training window: fit_rows and the evaluation rows."
    )
    fit_rows: int | None = Field(
        None, ge=0, description="Rows the candidate was fit on: the window minus the evaluation."
    )
    time: datetime = Field(default_factory=_now)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.status == "failed" and not self.error:
            raise ValueError("a failed report must carry the error")
        if self.status == "succeeded" and self.candidate is None:
            raise ValueError("a succeeded report must carry the candidate's metrics")
        return self


class Decision(Message):
    """The gatekeeper's decision on a run (``stage`` "gate"), or on its canary ("canary").

    - gate: ``promoted`` (the candidate serves all traffic), ``rejected``, or ``canary``
      (it passed, and serves ``gate.canary.percent`` of the traffic until judged);
    - canary: ``promoted`` (the canary completed: it serves all traffic) or ``rolled_back``
      (``previous_champion`` serves again); ``live`` holds the numbers it was judged on.
    """

    model: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    verdict: Literal["promoted", "rejected", "canary", "rolled_back"]
    reasons: list[str] = Field(min_length=1)
    new_version: str | None = None
    previous_champion: str | None = None
    stage: Literal["gate", "canary"] = "gate"
    live: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Canary stage: per version, its live metric and labelled rows on the "
        "window it was judged on.",
    )
    time: datetime = Field(default_factory=_now)


class DriftAlert(Message):
    """Our own drift alert, published to ``drift-alerts`` by the data-arrival check, or by
    the monitor (``serving_drift`` in the served inputs, ``degradation`` of the live metric
    from late labels), which keys it by its window in ``details["window"]``."""

    model: str = Field(min_length=1)
    kind: Literal["drift", "degradation", "schema_change", "serving_drift"]
    data_uris: list[str] = Field(default_factory=list)
    summary: str
    details: dict[str, Any] = Field(default_factory=dict)
    time: datetime = Field(default_factory=_now)


ALL_MODELS = "*"


class ScheduleMessage(Message):
    """What Cloud Scheduler (or the local scheduler, or an operator) sends to retrain-schedule.

    ``{"model": "*", "reason": "sweep"}`` (Cloud Scheduler, every few minutes) starts a run
    for each model whose events wait with no run in flight: a run that died without a
    report holds its model's lease until it expires, and a quiet model has no other event
    to notice that. ``{"model": "*", "reason": "monitor"}`` (every ``monitor_seconds``) runs
    one pass of the monitor over every model (:mod:`retrain.monitoring`). ``schema_version``
    may be left out, so that a hand-written
    ``gcloud pubsub topics publish retrain-schedule --message='{"model": "rainfall"}'`` works.
    """

    model: str = Field(min_length=1)
    reason: Literal["schedule", "manual", "sweep", "monitor"] = "schedule"
    scheduled_time: datetime | None = None
    dedupe_key: str | None = Field(None, min_length=1)
    data_uris: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sweep(self) -> Self:
        if (self.model == ALL_MODELS) != (self.reason in ("sweep", "monitor")):
            raise ValueError(
                f'model "{ALL_MODELS}" goes with reason "sweep" (start a run for every model '
                'with waiting events and no run in flight) or "monitor" (a pass of the '
                "monitor over every model), and only with them"
            )
        return self


class MessageError(ValueError):
    """A message that does not match its schema; the text names the field and the reason."""


M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()


def decode(kind: type[M], data: bytes) -> M:
    """Parse ``data`` as a ``kind`` message, or raise :class:`MessageError`."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"{kind.__name__}: {len(data)} bytes is over the {MAX_MESSAGE_BYTES} limit"
        )
    try:
        return kind.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: "
            f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise MessageError(f"{kind.__name__}: {problems}") from exc
