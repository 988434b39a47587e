"""The monitor: what a model serves, checked against what it was trained on and, once late
labels arrive, against the truth (docs/monitoring.md, "The monitor").

One pass (:meth:`Monitor.check`, run by ``RetrainService.monitor``: the ``monitor`` schedule
message, every ``monitor_seconds``, or ``retrain monitor``) does, for one model:

* **serving drift**: the prediction log (:mod:`retrain.predictions`) is cut into tumbling
  windows of ``monitoring.window_seconds``, aligned to the epoch. Each window that is
  complete (its end at least :data:`LATE_SECONDS` ago, so that every writer has flushed it)
  and not checked yet (a cursor in Firestore, ``monitoring/<model>``) is checked, if it holds
  at least ``monitoring.min_rows`` logged rows, with the arrival check's own code
  (:func:`retrain.drift.check_drift`, the champion's reference statistics, the model's
  ``drift`` policy). A drifted window raises one ``serving_drift`` DriftAlert keyed by the
  window: a second pass, or a replay, claims nothing new and publishes nothing.
* **live metrics**: late labels (objects under ``labels_prefix`` in the data bucket) join the
  logged predictions by ``(request_id, index)``; per version, over the last window
  (``[now - window_seconds, now]``), the accuracy and, with both classes, the ROC AUC of the
  labelled predictions. A version whose live figure falls more than
  ``drift.degradation_margin`` below its evaluation figure (with at least ``min_rows``
  labelled predictions) raises one ``degradation`` DriftAlert per window.
* **the canary** (``registry.canary``): canary and previous champion, judged on the same
  window (every prediction since the canary started); once the canary has
  ``gate.canary.min_labelled`` labelled predictions the gatekeeper settles it
  (:meth:`CanaryJudge.settle_canary`).

Each window's figures are kept in ``monitoring/<model>/windows/<end, 12-digit epoch s>``
(:func:`history` reads them back). A prediction-log or labels object that cannot be read is
named in the pass's problems and skipped; it never stops the pass.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from retrain import blobstore
from retrain.predictions import MAX_SPAN_SECONDS, LogError, PredictionRecord, decode, time_key
from retrain.statedb import Change, retrying

if TYPE_CHECKING:
    import pandas as pd

    from retrain.config import ModelSettings, Settings
    from retrain.gatekeeper.registry import CanaryState, FirestoreRegistry, ModelVersion
    from retrain.messages import DriftAlert
    from retrain.statedb import Database

__all__ = [
    "LATE_SECONDS",
    "MAX_BACKLOG_WINDOWS",
    "AlertSink",
    "CanaryJudge",
    "LabelError",
    "Monitor",
    "MonitorPass",
    "check_labels",
    "class_index",
    "complete_windows",
    "degradation_reasons",
    "history",
    "live_metrics",
    "parse_labels",
    "publish_labels",
    "served_frame",
    "window_id",
    "window_of",
]

LATE_SECONDS = 2 * MAX_SPAN_SECONDS
"""A window is complete this long after its end: a writer's object spans at most
MAX_SPAN_SECONDS and is written once it closes, so by then every record of the window is
in the store."""
MAX_BACKLOG_WINDOWS = 48
"""A model's first pass (no cursor yet) looks back at most this many windows; so does a pass
after the monitor was off for longer."""
LABELS_HORIZON_SECONDS = 3600.0
"""Labels objects created this long before the earliest prediction a pass joins are still
read (clocks differ); older ones cannot hold labels for it."""
THRESHOLD = 0.5
"""Decision threshold on P(positive class) where a record has no predicted labels."""

Key = tuple[str, int]  # (request_id, index)


class LabelError(ValueError):
    """A labels file that is not in the format; names the object, the row and the field."""


class CanaryJudge(Protocol):
    """The gatekeeper's port that completes or rolls back a canary from its live numbers."""

    def settle_canary(self, model: str, live: dict[str, dict[str, float]]) -> Any:
        """Judge and commit (compare-and-swap); the Decision, or None if nothing moved."""
        ...


class AlertSink(Protocol):
    """Claims the alert's run through the ledger under ``key``, then publishes the alert
    with that key (``RetrainService`` does, as for the arrival check's alerts); the message
    id, or None if the key was claimed before (nothing is published again)."""

    def __call__(self, alert: DriftAlert, key: str) -> str | None: ...


# -- windows ----------------------------------------------------------------------------------


def window_of(at: float, seconds: float) -> tuple[float, float]:
    """The tumbling window ``[start, end)`` that holds ``at``, aligned to the epoch."""
    start = math.floor(at / seconds) * seconds
    return start, start + seconds


def window_id(end: float) -> str:
    """A window's document id: its end in whole epoch seconds, 12 digits (sorts by time)."""
    return f"{round(end):012d}"


def complete_windows(
    first: float, now: float, seconds: float, late: float = LATE_SECONDS
) -> list[tuple[float, float]]:
    """The windows from the one holding ``first`` whose end is at least ``late`` before
    ``now``, oldest first."""
    start, _ = window_of(first, seconds)
    found = []
    while start + seconds + late <= now:
        found.append((start, start + seconds))
        start += seconds
    return found


# -- labels -----------------------------------------------------------------------------------


def parse_labels(data: bytes, where: str) -> dict[Key, Any]:
    """The labels of one object: CSV with a header, or JSON lines (a first line that starts
    with ``{``); ``request_id`` and ``label`` required, ``index`` optional (default 0).
    Raises :class:`LabelError` naming ``where``, the row and the field."""
    text = data.decode("utf-8-sig", errors="strict") if data else ""
    rows: Iterable[tuple[int, Any]]
    if text.lstrip().startswith("{"):
        rows = _json_rows(text, where)
    else:
        reader = csv.DictReader(io.StringIO(text))
        fields = reader.fieldnames or []
        missing = [name for name in ("request_id", "label") if name not in fields]
        if missing:
            raise LabelError(
                f"{where}: the header {fields} lacks column(s) {missing} "
                "(request_id, label, optional index)"
            )
        rows = ((number, row) for number, row in enumerate(reader, start=2))
    labels: dict[Key, Any] = {}
    for number, row in rows:
        key, label = _label_row(row, f"{where}, row {number}")
        labels[key] = label
    return labels


def _json_rows(text: str, where: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise LabelError(f"{where}, line {number}: not JSON: {exc}") from exc


def _label_row(row: Any, where: str) -> tuple[Key, Any]:
    if not isinstance(row, dict):
        raise LabelError(f"{where}: not an object with request_id and label")
    request_id = row.get("request_id")
    if request_id is None or str(request_id).strip() == "":
        raise LabelError(f"{where}: field 'request_id' is missing or empty")
    label = row.get("label")
    if label is None or (isinstance(label, str) and label.strip() == ""):
        raise LabelError(f"{where}: field 'label' is missing or empty")
    raw_index = row.get("index")
    if raw_index is None or raw_index == "":
        index = 0
    else:
        try:
            index = int(str(raw_index).strip())
        except ValueError as exc:
            raise LabelError(
                f"{where}: field 'index' must be a whole number >= 0, not {raw_index!r}"
            ) from exc
        if index < 0:
            raise LabelError(f"{where}: field 'index' must be a whole number >= 0, not {index}")
    return (str(request_id).strip(), index), label


def check_labels(settings: Settings, model: str, data: bytes, where: str) -> dict[Key, Any]:
    """The labels of a file meant for ``model``; :class:`LabelError` if the model is unknown,
    or the file is not in the format (:func:`parse_labels`) or holds no labels."""
    if model not in settings.models:
        known = ", ".join(sorted(settings.models))
        raise LabelError(f"{model!r} is not a model in retrain.yaml (models: {known})")
    labels = parse_labels(data, where)
    if not labels:
        raise LabelError(f"{where}: no labels (a header and at least one row are needed)")
    return labels


def publish_labels(settings: Settings, storage: Any, model: str, data: bytes, where: str) -> str:
    """Check a labels file (:func:`parse_labels`; :class:`LabelError` names the bad row and
    field) and upload it under the model's labels prefix with a new, time-ordered name
    (never over another object); its gs:// URI. ``where`` names the file in errors."""
    import uuid  # noqa: PLC0415

    check_labels(settings, model, data, where)
    suffix = ".jsonl" if data.decode("utf-8-sig").lstrip().startswith("{") else ".csv"
    name = f"{settings.labels_prefix(model)}{time_key(time.time())}-{uuid.uuid4().hex[:12]}{suffix}"
    blob = storage.bucket(settings.buckets.data).blob(name)
    blob.upload_from_string(data, content_type="text/plain", if_generation_match=0)
    return f"gs://{settings.buckets.data}/{name}"


def class_index(value: Any, classes: list[Any]) -> int | None:
    """Which of the model's two ``classes`` ``value`` names (0 or 1): equal, equal as text
    (a CSV label "1" for the class 1), or equal as a number ("1.0"); None if neither."""
    for i, known in enumerate(classes):
        if value == known:
            return i
    text = str(value).strip()
    for i, known in enumerate(classes):
        if text == str(known):
            return i
    try:
        number = float(text)
    except ValueError:
        return None
    for i, known in enumerate(classes):
        try:
            if float(str(known)) == number:
                return i
        except ValueError:
            continue
    return None


# -- what was served ----------------------------------------------------------------------------


def served_frame(records: Iterable[PredictionRecord], features: list[str]) -> pd.DataFrame:
    """One row per logged instance, with the model's ``features`` as columns: an instance
    given as a list is in feature order; one given as an object is read by name (a missing
    feature is null). Raises ValueError for an instance of another shape."""
    import pandas as pd  # noqa: PLC0415 (the monitor's callers pay for pandas once)

    rows: list[list[Any]] = []
    for record in records:
        for i, instance in enumerate(record.instances):
            if isinstance(instance, dict):
                rows.append([instance.get(name) for name in features])
            elif isinstance(instance, list) and len(instance) == len(features):
                rows.append(list(instance))
            else:
                raise ValueError(
                    f"request {record.request_id}, instance {i}: expected a list of "
                    f"{len(features)} values in feature order or an object by feature name"
                )
    return pd.DataFrame(rows, columns=features)


def live_metrics(
    records: Iterable[PredictionRecord],
    labels: Mapping[Key, Any],
    classes: list[Any],
    versions: Iterable[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Per version: ``served`` (logged instances), ``labelled`` (those with a known label),
    and on the labelled ones ``accuracy`` (predicted class, or score >= 0.5 where the record
    has none) and ``roc_auc`` (from the scores, when both classes are present). Labels that
    name neither class are left out, counted in ``foreign`` (only where there are any).
    ``versions`` are listed even if they served nothing."""
    served: dict[str, int] = {str(v): 0 for v in versions or ()}
    truth: dict[str, list[int]] = {}
    predicted: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    foreign: dict[str, int] = {}
    for record in records:
        served[record.version] = served.get(record.version, 0) + len(record.instances)
        for i, score in enumerate(record.scores):
            label = labels.get((record.request_id, i))
            if label is None:
                continue
            actual = class_index(label, classes)
            if actual is None:
                foreign[record.version] = foreign.get(record.version, 0) + 1
                continue
            said = class_index(record.labels[i], classes) if i < len(record.labels) else None
            truth.setdefault(record.version, []).append(actual)
            predicted.setdefault(record.version, []).append(
                said if said is not None else int(score >= THRESHOLD)
            )
            scores.setdefault(record.version, []).append(score)
    live: dict[str, dict[str, float]] = {}
    for version, count in sorted(served.items()):
        figures: dict[str, float] = {"served": count, "labelled": len(truth.get(version, []))}
        if foreign.get(version):
            figures["foreign"] = foreign[version]
        if truth.get(version):
            from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: PLC0415

            figures["accuracy"] = float(accuracy_score(truth[version], predicted[version]))
            if len(set(truth[version])) == 2:
                figures["roc_auc"] = float(roc_auc_score(truth[version], scores[version]))
        live[version] = figures
    return live


def degradation_reasons(
    live: Mapping[str, Mapping[str, float]],
    evaluated: Mapping[str, Mapping[str, float]],
    margin: float,
    min_labelled: int,
) -> list[str]:
    """Why each version's live figures fell more than ``margin`` below its evaluation
    figures (``evaluated[version]``); versions with fewer than ``min_labelled`` labelled
    predictions, or no evaluation figures, are not judged."""
    reasons = []
    for version, figures in sorted(live.items()):
        reference = evaluated.get(version)
        if not reference or figures.get("labelled", 0) < min_labelled:
            continue
        for name in ("roc_auc", "accuracy"):
            known = name in figures and name in reference and math.isfinite(reference[name])
            if known and figures[name] < reference[name] - margin:
                reasons.append(
                    f"v{version} live {name} {figures[name]:.4f} < evaluation "
                    f"{reference[name]:.4f} - {margin:.2f} ({figures['labelled']:.0f} labelled)"
                )
    return reasons


# -- the pass ---------------------------------------------------------------------------------


@dataclass
class MonitorPass:
    """What one pass found for one model (``retrain monitor`` prints it)."""

    model: str
    windows: list[dict[str, Any]] = field(default_factory=list)  # the windows checked now
    live: dict[str, Any] = field(default_factory=dict)  # the last window, sliding
    alerts: list[dict[str, Any]] = field(default_factory=list)  # kind, key, message_id
    canary: str = ""
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "windows": self.windows, "live": self.live,
            "alerts": self.alerts, "canary": self.canary, "problems": self.problems,
        }  # fmt: skip

    def summary(self) -> str:
        drifted = sum(1 for w in self.windows if w.get("drifted"))
        parts = [f"{len(self.windows)} window(s) checked, {drifted} drifted"]
        new = [a for a in self.alerts if a.get("message_id")]
        if self.alerts:
            parts.append(f"{len(new)} alert(s) published of {len(self.alerts)} raised")
        if self.canary:
            parts.append(f"canary: {self.canary}")
        if self.problems:
            parts.append(f"{len(self.problems)} problem(s): {'; '.join(self.problems[:3])}")
        return ", ".join(parts)


class Monitor:
    """The monitor of every model in ``settings`` (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        registry: FirestoreRegistry,
        storage: Any,
        alert: AlertSink,
        judge: CanaryJudge | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``storage`` is a ``google.cloud.storage.Client`` (reads the prediction log and the
        labels); ``judge`` settles canaries (the gatekeeper); ``clock`` is the time now."""
        self.settings = settings
        self.db = db
        self.registry = registry
        self.storage = storage
        self.alert = alert
        self.judge = judge
        self.clock = clock
        self._metadata: dict[str, dict[str, Any]] = {}
        self._labels: dict[tuple[str, int], dict[Key, Any]] = {}

    # -- the pass ----------------------------------------------------------------------

    def check(self, model: str) -> MonitorPass:
        """One pass over ``model``: its complete unchecked windows, the last window's live
        metrics, and its canary."""
        spec = self.settings.models[model]
        result = MonitorPass(model)
        champion = self.registry.champion(model)
        if champion is None:
            result.problems.append("no champion yet: nothing is served")
            return result
        now = self.clock()
        seconds = spec.monitoring.window_seconds
        metadata = self._champion_metadata(champion)
        canary = self.registry.canary(model)
        cursor = self.db.read_path("monitoring", model)
        checked_until = cursor.get("checked_until")
        oldest = window_of(now, seconds)[0] - MAX_BACKLOG_WINDOWS * seconds
        first = max(float(checked_until), oldest) if checked_until is not None else None
        if first is None:
            first = self._first_logged(model, oldest, now)
        windows = complete_windows(first, now, seconds) if first is not None else []
        since = min([now - seconds] + [s for s, _ in windows[:1]])
        if canary is not None:  # (a canary older than the backlog is judged on the backlog)
            since = min(since, max(canary.started_at, oldest))
        records = self._records(model, since, now, result.problems)
        labels = self._read_labels(model, since, result.problems)
        for start, end in windows:
            inside = [r for r in records if start <= r.time < end]
            if inside:  # an empty window leaves no figures; the cursor passes it below
                result.windows.append(
                    self._check_window(model, spec, metadata, start, end, inside, labels, result)
                )
        if windows:
            self._keep_window(model, windows[-1][1], None, {}, cursor=True)
        judged = canary.version if canary is not None else None
        self._check_live(model, spec, metadata, now, records, labels, result, judged)
        if canary is not None:
            result.canary = self._check_canary(model, spec, metadata, canary, records, labels)
        elif (
            spec.gate.canary is not None
            and self.judge is not None
            # No canary now: a canary Decision kept but not published (a crash between the
            # gatekeeper's commit and its publish) is finished by this call.
            and self.judge.settle_canary(model, {}) is not None
        ):
            result.canary = "a canary decision kept before a crash was published"
        return result

    def _check_window(
        self, model: str, spec: ModelSettings, metadata: dict[str, Any], start: float,
        end: float, records: list[PredictionRecord], labels: Mapping[Key, Any],
        result: MonitorPass,
    ) -> dict[str, Any]:  # fmt: skip
        """Check one complete window, raise its alert if it drifted, keep its figures and
        move the cursor past it (one commit)."""
        from retrain.drift import check_drift  # noqa: PLC0415
        from retrain.messages import DriftAlert  # noqa: PLC0415

        served = sum(len(r.instances) for r in records)
        figures: dict[str, Any] = {
            "start": start, "end": end, "served": served, "drift": None, "drifted": None,
            "live": live_metrics(records, labels, list(metadata["classes"])),
            "checked_at": self.clock(),
        }  # fmt: skip
        alerts: dict[str, str | None] = {}
        if served < spec.monitoring.min_rows:
            figures["note"] = f"{served} rows < monitoring.min_rows {spec.monitoring.min_rows}"
        else:
            try:
                frame = served_frame(records, [str(f) for f in metadata["features"]])
                report = check_drift(frame, metadata, spec.drift)
            except ValueError as exc:
                figures["note"] = f"not checked: {exc}"
                result.problems.append(f"window {window_id(end)}: {exc}")
            else:
                figures["drift"] = {
                    name: {"psi": f.psi, "statistic": f.statistic, "pvalue": f.pvalue,
                           "drifted": f.drifted, "test": f.test}
                    for name, f in report.features.items()
                }  # fmt: skip
                figures["drifted"] = report.drifted
                figures["summary"] = report.summary()
                if report.drifted:
                    key = f"serving_drift:{model}:{window_id(start)}"
                    alert = DriftAlert(
                        model=model, kind="serving_drift",
                        summary=f"serving drift in window {_clock(start)}-{_clock(end)}: "
                        f"{report.summary()}",
                        details={"window": {"start": start, "end": end}, "drift": report.to_dict(),
                                 "champion_version": metadata.get("_version")},
                    )  # fmt: skip
                    alerts["serving_drift"] = self.alert(alert, key)
                    result.alerts.append({"kind": "serving_drift", "key": key,
                                          "message_id": alerts["serving_drift"]})  # fmt: skip
        self._keep_window(model, end, figures, alerts, cursor=True)
        return figures

    def _check_live(
        self, model: str, spec: ModelSettings, metadata: dict[str, Any], now: float,
        records: list[PredictionRecord], labels: Mapping[Key, Any], result: MonitorPass,
        canary: str | None = None,
    ) -> None:  # fmt: skip
        """The live metrics of the last window per version; a degradation alert, once per
        (aligned) window, if a version fell below its evaluation figures. A ``canary``
        version is not: its canary judges it (an alert would start a run whose candidate
        could replace the canary before it is judged)."""
        from retrain.messages import DriftAlert  # noqa: PLC0415

        seconds = spec.monitoring.window_seconds
        recent = [r for r in records if now - seconds <= r.time <= now]
        live = live_metrics(recent, labels, list(metadata["classes"]))
        evaluated = {}
        for version in live:
            if version == canary:
                continue
            found = self.registry.version(model, version)
            if found is not None:
                evaluated[version] = found.metrics
        margin = spec.drift.degradation_margin
        reasons = degradation_reasons(live, evaluated, margin, spec.monitoring.min_rows)
        start, end = window_of(now, seconds)
        result.live = {"start": now - seconds, "end": now, "versions": live}
        if strangers := sum(int(f.get("foreign", 0)) for f in live.values()):
            result.problems.append(
                f"{strangers} labels of predictions in the last window name neither class "
                f"of the model ({', '.join(map(repr, metadata['classes']))}): left out"
            )
        if not live:
            return  # nothing served in the last window: nothing to keep
        alerts: dict[str, str | None] = {}
        if reasons:
            key = f"degradation:{model}:{window_id(start)}"
            alert = DriftAlert(
                model=model, kind="degradation", summary="; ".join(reasons),
                details={"window": {"start": now - seconds, "end": now}, "live": live,
                         "evaluation": evaluated, "margin": margin},
            )  # fmt: skip
            alerts["degradation"] = self.alert(alert, key)
            result.alerts.append(
                {"kind": "degradation", "key": key, "message_id": alerts["degradation"]}
            )
        self._keep_window(
            model,
            end,
            {"start": start, "end": end, "live": live, "live_as_of": now},
            alerts,
            cursor=False,
        )

    def _check_canary(
        self, model: str, spec: ModelSettings, metadata: dict[str, Any], canary: CanaryState,
        records: list[PredictionRecord], labels: Mapping[Key, Any],
    ) -> str:  # fmt: skip
        """Judge the canary once it has enough labelled predictions; what happened."""
        policy = spec.gate.canary
        needed = policy.min_labelled if policy is not None else 0
        since = [r for r in records if r.time >= canary.started_at]
        live = live_metrics(
            (r for r in since if r.version in (canary.version, canary.previous)),
            labels, list(metadata["classes"]), versions=(canary.version, canary.previous),
        )  # fmt: skip
        labelled = int(live[canary.version]["labelled"])
        if self.judge is None:
            return f"v{canary.version}: {labelled} labelled, but nothing settles canaries"
        # Called on every pass, ready or not: it also publishes a Decision kept before a crash.
        decision = self.judge.settle_canary(model, live)
        if labelled < needed:
            return f"v{canary.version} waits: {labelled} of {needed} labelled predictions"
        if decision is None:
            return f"v{canary.version}: not settled (the pointer moved, or not judged yet)"
        verdict = getattr(decision, "verdict", decision)
        return f"v{canary.version} {verdict} on {labelled} labelled predictions"

    # -- Firestore -------------------------------------------------------------------------

    def _keep_window(
        self, model: str, end: float, figures: dict[str, Any] | None,
        alerts: dict[str, str | None], *, cursor: bool,
    ) -> None:  # fmt: skip
        """Write a window's figures (if any; its alerts merged with those it has), and with
        ``cursor`` move the model's cursor past it, in one commit. A pass that lost a race
        to another leaves the window as that one wrote it."""

        def attempt() -> None:
            change = Change()
            if cursor:
                head = self.db.read_path("monitoring", model)
                if float(head.get("checked_until") or 0) >= end:
                    return  # another pass checked it first
                change.put(head, {"checked_until": end, "at": self.clock()})
            if figures is not None:
                doc = self.db.read_path("monitoring", model, "windows", window_id(end))
                kept = dict(doc.get("alerts") or {})
                kept.update({k: v for k, v in alerts.items() if v is not None or k not in kept})
                change.put(doc, {**figures, "alerts": kept})
            self.db.commit(change)

        retrying(attempt, f"keep window {window_id(end)} of {model}")

    # -- the store -------------------------------------------------------------------------

    def _log_location(self, model: str) -> tuple[Any, str]:
        bucket, prefix = blobstore.split_uri(self.settings.predictions_prefix(model))
        return self.storage.bucket(bucket), prefix

    def _first_logged(self, model: str, oldest: float, now: float) -> float | None:
        """The first-record time of the oldest log object since ``oldest``, if any."""
        from retrain.predictions import time_of  # noqa: PLC0415

        bucket, prefix = self._log_location(model)
        blobs = self.storage.list_blobs(
            bucket, prefix=prefix, start_offset=prefix + time_key(oldest),
            end_offset=prefix + time_key(now), max_results=1,
        )  # fmt: skip
        for blob in blobs:
            try:
                return time_of(blob.name)
            except LogError:
                return oldest
        return None

    def _records(
        self, model: str, since: float, until: float, problems: list[str]
    ) -> list[PredictionRecord]:
        """Every logged record with ``since <= time <= until``; an object that cannot be
        read is named in ``problems`` and skipped."""
        bucket, prefix = self._log_location(model)
        blobs = self.storage.list_blobs(
            bucket, prefix=prefix, start_offset=prefix + time_key(since - MAX_SPAN_SECONDS),
            end_offset=prefix + time_key(until + 1),
        )  # fmt: skip
        records: list[PredictionRecord] = []
        for blob in blobs:
            where = f"gs://{bucket.name}/{blob.name}"
            try:
                found = decode(blob.download_as_bytes(), where)
            except LogError as exc:
                problems.append(str(exc))
                continue
            records.extend(r for r in found if since <= r.time <= until and r.model == model)
        return records

    def _read_labels(self, model: str, since: float, problems: list[str]) -> dict[Key, Any]:
        """The labels of every labels object created since ``since`` (less a horizon); one
        that cannot be read is named in ``problems`` and skipped. Parsed objects are kept
        by name and generation."""
        bucket = self.storage.bucket(self.settings.buckets.data)
        horizon = since - LABELS_HORIZON_SECONDS
        labels: dict[Key, Any] = {}
        seen: set[tuple[str, int]] = set()
        for blob in self.storage.list_blobs(bucket, prefix=self.settings.labels_prefix(model)):
            if blob.name.endswith("/"):
                continue
            created = blob.time_created.timestamp() if blob.time_created else None
            if created is not None and created < horizon:
                continue
            cached = (blob.name, int(blob.generation or 0))
            seen.add(cached)
            if cached not in self._labels:
                where = f"gs://{bucket.name}/{blob.name}"
                try:
                    self._labels[cached] = parse_labels(blob.download_as_bytes(), where)
                except (LabelError, UnicodeDecodeError) as exc:
                    problems.append(f"{where}: {exc}" if isinstance(exc, UnicodeDecodeError)
                                    else str(exc))  # fmt: skip
                    continue
            labels.update(self._labels[cached])
        prefix = self.settings.labels_prefix(model)  # forget what this model no longer reads
        self._labels = {
            k: v for k, v in self._labels.items() if k in seen or not k[0].startswith(prefix)
        }
        return labels

    def _champion_metadata(self, champion: ModelVersion) -> dict[str, Any]:
        """The champion's ``metadata.json`` (features, classes, reference statistics), read
        once per artifact."""
        found = self._metadata.get(champion.artifact_uri)
        if found is None:
            uri = blobstore.join(champion.artifact_uri, "metadata.json")
            data = blobstore.read_bytes(uri, self.storage)
            if data is None:
                raise FileNotFoundError(f"{uri} does not exist: the champion has no metadata")
            found = {**orjson.loads(data), "_version": champion.version}
            self._metadata[champion.artifact_uri] = found
        return found


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def history(db: Database, model: str, limit: int = 24) -> list[dict[str, Any]]:
    """The last ``limit`` windows of ``model`` kept by the monitor, oldest first: each
    ``{start, end, served, drift, drifted, live, alerts, ...}`` as docs/monitoring.md says."""
    collection = db.client.collection("monitoring", model, "windows")
    direction = _descending()
    found = collection.order_by("end", direction=direction).limit(limit).stream()
    return [snapshot.to_dict() or {} for snapshot in found][::-1]


def _descending() -> Any:
    from retrain.statedb import firestore  # noqa: PLC0415

    return firestore().Query.DESCENDING
