"""The main job, end to end on real data: replay the drifting rainfall stream.

Test, then train: each 1,000-row chunk is first scored through the prediction service
against the champion being served at that moment, then uploaded as a new data object; the
demo waits until that event has settled (no run started, or a run ended in a decision)
before the next chunk. Nothing is faked: every step goes through the local stack.

The live loop runs beside it: the prediction server logs what it answered, the labels of
each scored chunk arrive one chunk late (``labels/<model>/``, keyed by the request id), and
a monitor pass after each chunk gives the live accuracy of the version that served it and
checks each complete window of served inputs for drift (a ``serving_drift`` alert starts a
run, which the chunk waits for too).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.ledger import FirestoreLedger
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import wait_until
from retrain.statedb import Database

__all__ = ["ChunkResult", "DemoResult", "load_stream", "replay"]

FIRST_ROWS = 3000
CHUNK_ROWS = 1000
DRIFT_AT = 12_000
SETTLE_TIMEOUT = 300.0
LOG_WAIT_SECONDS = 15.0  # the longest the demo waits for a chunk's predictions in the log
DEMO_WINDOW_SECONDS = 30.0  # the monitor's window in the demo (a chunk takes seconds)


def load_stream(path: Path) -> pd.DataFrame:
    """rainfall.csv(.gz) with its unnamed index column named ``day`` (the order column)."""
    frame = pd.read_csv(path)
    return frame.rename(columns={"Unnamed: 0": "day"})


@dataclass
class ChunkResult:
    start: int
    end: int
    served_version: str
    served_accuracy: float
    static_accuracy: float
    check: str = ""  # what the arrival check decided: no_drift, drift, degradation
    runs: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    # The monitor, once the labels of the chunk before arrived: the live accuracy of the
    # version that served it (on its labelled predictions of the last window), its alerts.
    live_accuracy: float | None = None
    alerts: list[str] = field(default_factory=list)


@dataclass
class DemoResult:
    model: str
    chunks: list[ChunkResult]
    runs: int
    promotions: int
    rejections: int
    seconds: float
    promoted_at: list[int]

    def accuracy(self, which: str, after: bool) -> float:
        rows = [c for c in self.chunks if (c.start >= DRIFT_AT) == after]
        if not rows:
            return float("nan")
        values = [c.served_accuracy if which == "served" else c.static_accuracy for c in rows]
        return sum(values) / len(values)


class _Demo:
    def __init__(self, stack: Stack, model: str, say: Callable[[str], None]) -> None:
        self.stack = stack
        self.model = model
        self.say = say
        settings = stack.settings
        self.spec = settings.models[model]
        client = emulators.storage_client(stack.gcs_url, settings.project)
        self.gcs = client
        db = Database(
            emulators.firestore_client(stack.firestore_host, settings.project, settings.database)
        )
        self.ledger = FirestoreLedger(db)
        self.registry = FirestoreRegistry(db, settings.buckets.models, client)
        self.prefix = f"{self.spec.data_prefix}demo-{time.strftime('%Y%m%d-%H%M%S')}/"
        base = f"http://{settings.local.host}:{settings.local.ports.serving}/v1/projects/"
        self.base = f"{base}{settings.project}/locations/{settings.region}"
        self._service: Any = None

    @property
    def service(self) -> Any:
        """The service, in this process, for the monitor's passes (as `retrain monitor`)."""
        if self._service is None:
            from retrain.service import build_service  # noqa: PLC0415

            os.environ.update(self.stack.env())  # the stack's emulators, for its clients
            self._service = build_service(self.stack.settings, self.stack.config_path)
        return self._service

    def label(self, frame: pd.DataFrame, request_id: str) -> None:
        """The labels of a scored chunk arrive: one per instance of its request."""
        from retrain.monitoring import publish_labels  # noqa: PLC0415

        labels = pd.DataFrame(
            {"request_id": request_id, "index": range(len(frame)),
             "label": frame[self.spec.label].to_numpy()}
        )  # fmt: skip
        data = labels.to_csv(index=False).encode()
        publish_labels(self.stack.settings, self.gcs, self.model, data, request_id)

    def monitor(self, version: str) -> tuple[float | None, list[str]]:
        """A monitor pass: ``version``'s live accuracy, and the alerts it raised. The server
        writes its log every second or so, off the request path: a pass that ran before the
        chunk's predictions were written (so its labels joined nothing) is run again."""
        alerts: list[str] = []
        live: dict[str, Any] = {}

        def joined() -> bool:
            nonlocal live
            found = self.service.monitor_passes([self.model])[self.model]
            if isinstance(found, str):
                raise RuntimeError(f"the monitor's pass failed: {found}")  # noqa: TRY004
            alerts.extend(str(a["kind"]) for a in found.alerts)
            live = (found.live.get("versions") or {}).get(version) or {}
            return "accuracy" in live

        wait_until(joined, timeout=LOG_WAIT_SECONDS, interval=0.5)
        return live.get("accuracy"), alerts

    def upload(self, frame: pd.DataFrame, start: int, end: int) -> str:
        name = f"{self.prefix}rows-{start:05d}-{end:05d}.csv"
        blob = self.gcs.bucket(self.stack.settings.buckets.data).blob(name)
        blob.upload_from_string(frame.to_csv(index=False), content_type="text/csv")
        return f"{self.stack.settings.buckets.data}/{name}#{blob.generation}"

    def _post(self, url: str, rows: list[list[float]], request_id: str) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 (our loopback server)
            url, json.dumps({"instances": rows}).encode(),
            {"Content-Type": "application/json", "X-Request-Id": request_id},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            answer: dict[str, Any] = json.loads(response.read())
        return answer

    def score(
        self, frame: pd.DataFrame, request_id: str, version: str | None = None
    ) -> tuple[str, float]:
        """Accuracy of the served champion (or of one version) on ``frame``, over REST."""
        features = [c for c in frame.columns if c not in (self.spec.label, self.spec.order_column)]
        rows = frame[features].to_numpy().tolist()
        url = (f"{self.base}/models/{self.model}@{version}:predict" if version
               else f"{self.base}/endpoints/{self.model}:predict")  # fmt: skip
        answer = self._post(url, rows, request_id)
        labels = [p["label"] for p in answer["predictions"]]
        correct = sum(int(a == b) for a, b in zip(labels, frame[self.spec.label], strict=True))
        return str(answer["modelVersionId"]), correct / len(rows)

    def served(self) -> str | None:
        try:
            with urllib.request.urlopen(  # noqa: S310
                f"{self.base}/endpoints/{self.model}", timeout=10
            ) as response:
                resource = json.loads(response.read())
        except OSError:
            return None
        deployed = resource.get("deployedModels") or []
        return str(deployed[0]["modelVersionId"]) if deployed else None

    def settle(self, key: str, runs_before: int) -> tuple[str, list[str], list[str]]:
        """Wait until the arrival ``key`` settled: checked, and any run it caused decided."""

        def checked() -> bool:
            arrival = self.ledger.arrival(self.model, key)
            claim = self.ledger.event(self.model, key)
            return bool((arrival and arrival.get("outcome")) or claim)

        if not wait_until(checked, timeout=SETTLE_TIMEOUT, interval=0.1):
            raise TimeoutError(f"the upload {key} was never handled; see the function logs")
        arrival = self.ledger.arrival(self.model, key) or {"outcome": "every_arrival"}
        outcome = str(arrival.get("outcome"))
        started = outcome not in ("no_drift",)
        alert = arrival.get("alert_key")  # the alert's request is keyed by the arrival

        def decided() -> bool:
            if self.ledger.lease(self.model) is not None or self.ledger.has_pending(self.model):
                return False
            runs = self.ledger.runs(self.model)
            if started and len(runs) <= runs_before:
                return False
            if alert and not (self.ledger.event(self.model, str(alert)) or {}).get("run_id"):
                return False
            return all(self.registry.decision(self.model, r.run_id) for r in runs[runs_before:])

        if not wait_until(decided, timeout=SETTLE_TIMEOUT, interval=0.2):
            raise TimeoutError(f"the run for {key} did not end in a decision in time")
        champion = self.registry.champion(self.model)
        if champion is not None and not wait_until(
            lambda: self.served() == champion.version, timeout=60, interval=0.05
        ):
            raise TimeoutError(f"v{champion.version} was promoted but never served")
        new = self.ledger.runs(self.model)[runs_before:]
        verdicts = []
        for run in new:
            kept = self.registry.decision(self.model, run.run_id) or {}
            decision = kept.get("decision", {})
            version = decision.get("new_version")
            verdicts.append(f"{decision.get('verdict')}{' v' + version if version else ''}")
        return outcome, [r.run_id for r in new], verdicts


def replay(
    stack: Stack,
    stream: pd.DataFrame,
    *,
    model: str = "rainfall",
    chunks: int | None = None,
    first_rows: int = FIRST_ROWS,
    chunk_rows: int = CHUNK_ROWS,
    start_chunk_at: int | None = None,
    step: Callable[[str], None] = lambda _: None,
    advance: Callable[[], None] = lambda: None,
) -> DemoResult:
    """Replay ``stream`` through the running ``stack``; returns what happened per chunk.

    ``start_chunk_at`` skips ahead (the first object is still rows 0..first_rows-1), which
    lets a short run cross the drift point.
    """
    started = time.monotonic()
    demo = _Demo(stack, model, step)
    step(f"uploading rows 0-{first_rows - 1}: the first champion")
    key = demo.upload(stream.iloc[:first_rows], 0, first_rows - 1)
    demo.settle(key, 0)
    if not wait_until(lambda: demo.served() is not None, timeout=60, interval=0.2):
        raise TimeoutError("the first champion was never served; see .retrain logs")
    static = demo.served()
    assert static is not None  # noqa: S101 (waited for above)
    results = []
    begin = start_chunk_at if start_chunk_at is not None else first_rows
    starts = list(range(begin, len(stream), chunk_rows))[: chunks if chunks else None]
    scored: tuple[pd.DataFrame, str, str] | None = None  # the chunk whose labels come next
    for start in starts:
        frame = stream.iloc[start : start + chunk_rows]
        end = start + len(frame) - 1
        step(f"rows {start}-{end}: scoring the served champion")
        request_id = f"demo-{demo.prefix.rstrip('/').rsplit('/', 1)[-1]}-{start}"
        version, accuracy = demo.score(frame, request_id)
        _, static_accuracy = demo.score(frame, f"{request_id}-static", static)
        runs_before = len(demo.ledger.runs(model))
        live: float | None = None
        alerts: list[str] = []
        if scored is not None:  # its labels arrive; how did the version that served it do?
            step(f"rows {start}-{end}: the labels of the chunk before arrive; monitoring")
            demo.label(scored[0], scored[1])
            live, alerts = demo.monitor(scored[2])
        scored = (frame, request_id, version)
        step(f"rows {start}-{end}: uploading, waiting for the event to settle")
        key = demo.upload(frame, start, end)
        outcome, runs, verdicts = demo.settle(key, runs_before)
        results.append(ChunkResult(start, end, version, accuracy, static_accuracy, outcome, runs,
                                   verdicts, live, alerts))  # fmt: skip
        advance()
    caused = demo.ledger.runs(model)[1:]  # the runs the chunks caused, not the first upload's
    decisions = [demo.registry.decision(model, r.run_id) or {} for r in caused]
    verdicts = [d.get("decision", {}).get("verdict") for d in decisions]
    promoted_at = [c.start for c in results if any(v.startswith("promoted") for v in c.decisions)]
    return DemoResult(
        model=model,
        chunks=results,
        runs=len(decisions),
        promotions=verdicts.count("promoted"),
        rejections=verdicts.count("rejected"),
        seconds=time.monotonic() - started,
        promoted_at=promoted_at,
    )


def write_report(result: DemoResult, html: Path, png: Path) -> None:
    """A plot of accuracy per chunk (served vs static, promotions marked), as PNG and HTML."""
    import base64  # noqa: PLC0415
    import html as escape  # noqa: PLC0415

    import matplotlib as mpl  # noqa: PLC0415 (only the demo needs matplotlib)

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    starts = [c.start for c in result.chunks]
    figure, axes = plt.subplots(figsize=(10, 4.5), dpi=110)
    axes.plot(starts, [c.served_accuracy for c in result.chunks], "o-", label="served (retrained)")
    axes.plot(starts, [c.static_accuracy for c in result.chunks], "s--", label="static first model")
    for i, start in enumerate(result.promoted_at):
        axes.axvline(start, color="green", alpha=0.3, label="promotion" if i == 0 else None)
    axes.axvline(DRIFT_AT, color="red", linestyle=":", label="drift starts (row 12,000)")
    axes.set_xlabel("first row of the chunk")
    axes.set_ylabel("accuracy on the chunk (before training on it)")
    axes.set_title(f"{result.model}: test-then-train accuracy per {CHUNK_ROWS}-row chunk")
    axes.set_ylim(0.4, 1.0)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    image = base64.b64encode(png.read_bytes()).decode()
    rows = "\n".join(
        f"<tr><td>{c.start}-{c.end}</td><td>v{escape.escape(c.served_version)}</td>"
        f"<td>{c.served_accuracy:.3f}</td><td>{c.static_accuracy:.3f}</td>"
        f"<td>{'-' if c.live_accuracy is None else f'{c.live_accuracy:.3f}'}</td>"
        f"<td>{escape.escape(c.check)}</td><td>{escape.escape(', '.join(c.alerts) or '-')}</td>"
        f"<td>{escape.escape(', '.join(c.decisions) or '-')}</td></tr>"
        for c in result.chunks
    )
    totals = (
        f"<p>Accuracy before row {DRIFT_AT:,}: served {result.accuracy('served', False):.3f}, "
        f"static {result.accuracy('static', False):.3f}. From row {DRIFT_AT:,}: served "
        f"{result.accuracy('served', True):.3f}, static {result.accuracy('static', True):.3f}."
        f"</p><p>{result.runs} runs for {len(result.chunks)} chunks; {result.promotions} "
        f"promotions, {result.rejections} rejections; {result.seconds:.0f} s.</p>"
    )
    html.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>retrain demo</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
</style></head><body><h1>retrain demo: {escape.escape(result.model)}</h1>
<img alt="accuracy per chunk" src="data:image/png;base64,{image}">{totals}
<p>Live accuracy: the labels of each chunk arrive one chunk late; the monitor then gives
the accuracy of the version that served it, on its labelled predictions of the last window. Monitor
alerts: serving drift in a complete window of served inputs, or a live metric below its
evaluation figure.</p>
<table><tr><th>rows</th><th>served</th><th>served accuracy</th><th>static accuracy</th>
<th>live accuracy</th><th>arrival check</th><th>monitor alerts</th><th>runs and decisions</th>
</tr>{rows}</table></body></html>
""",
        encoding="utf-8",
    )
