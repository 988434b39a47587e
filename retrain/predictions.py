"""The prediction log: what the prediction server wrote, and what the monitor reads.

The prediction server (``serving``) keeps a sample of its requests
(``models.<m>.serving.log_sample_rate``) and writes them, batched, off the request path, as
JSON-lines objects under :meth:`~retrain.config.Settings.predictions_prefix`::

    gs://<buckets.artifacts>/predictions/<model>/<first time>-<writer>-<seq>.jsonl

``<first time>`` is the time of the object's first record (``20261130T154501.123456Z``), so
names sort by time and a window is read by listing from a name; ``<writer>`` names the
process (host and pid) and ``<seq>`` counts its objects, so no two writers collide. An
object holds at most :data:`MAX_SPAN_SECONDS` of records.

One line per request (one request may carry several instances)::

    {"request_id": "…", "time": 1796053501.12, "model": "rainfall", "version": "3",
     "instances": [[…], …] or [{…}, …] as received, "scores": [P(positive), …],
     "labels": [predicted class, …]}

Late labels (``retrain publish labels``, or any object under
:meth:`~retrain.config.Settings.labels_prefix` in the data bucket) are CSV or JSON lines with
``request_id``, ``label`` and, for a request with several instances, ``index`` (default 0):
they join a logged prediction by ``(request_id, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = [
    "MAX_SPAN_SECONDS",
    "LogError",
    "PredictionRecord",
    "decode",
    "encode",
    "object_name",
    "time_key",
    "time_of",
]

# A writer starts a new object at least this often (it writes every second or so); the
# monitor checks a window twice this long after its end, once every writer has written it.
MAX_SPAN_SECONDS = 5.0
_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"


class LogError(ValueError):
    """A prediction-log object or line that is not in the format; names the object and line."""


@dataclass(frozen=True)
class PredictionRecord:
    """One logged request: its id, when, which version answered, what it received and said."""

    request_id: str
    time: float  # seconds since the epoch, when the response was made
    model: str
    version: str
    instances: list[Any]
    scores: list[float]  # P(positive class), one per instance
    labels: list[Any] = field(default_factory=list)  # the predicted class, one per instance


def time_key(at: float) -> str:
    """The sortable time in object names: ``20261130T154501.123456Z``."""
    return datetime.fromtimestamp(at, UTC).strftime(_TIME_FORMAT)


def time_of(name: str) -> float:
    """The first-record time of an object named by :func:`object_name` (a path or a name)."""
    stem = name.rsplit("/", 1)[-1]
    try:
        parsed = datetime.strptime(stem.split("-", 1)[0], _TIME_FORMAT)
        return parsed.replace(tzinfo=UTC).timestamp()
    except ValueError as exc:
        raise LogError(f"{name}: not a prediction-log object name ({exc})") from exc


def object_name(prefix: str, first: float, writer: str, seq: int) -> str:
    """``<prefix><first time>-<writer>-<seq>.jsonl``; ``prefix`` ends in ``/``."""
    safe = "".join(c if c.isalnum() or c in "._" else "_" for c in writer)
    return f"{prefix}{time_key(first)}-{safe}-{seq:06d}.jsonl"


def encode(records: list[PredictionRecord]) -> bytes:
    """JSON lines, one per record."""
    return b"".join(orjson.dumps(r) + b"\n" for r in records)  # orjson knows dataclasses


def decode(data: bytes, where: str) -> list[PredictionRecord]:
    """The records of one object; raises :class:`LogError` naming ``where`` and the line."""
    records = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
            record = PredictionRecord(
                request_id=str(raw["request_id"]),
                time=float(raw["time"]),
                model=str(raw["model"]),
                version=str(raw["version"]),
                instances=list(raw["instances"]),
                scores=[float(s) for s in raw["scores"]],
                labels=list(raw.get("labels") or []),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise LogError(f"{where}, line {number}: not a prediction record: {exc!r}") from exc
        if len(record.scores) != len(record.instances):
            raise LogError(
                f"{where}, line {number}: {len(record.instances)} instances but "
                f"{len(record.scores)} scores"
            )
        records.append(record)
    return records
