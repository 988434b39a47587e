"""A small local fake of the Kubeflow Pipelines v2beta1 REST API (as ``kfp.Client`` 2.17
speaks it): healthz, experiments (list by name, create), runs (list by name, with their
state; create) and recurring runs (list, create, delete).

It records every request and answers 404 or 400 to anything it does not know; the list
filters it understands are ``display_name EQUALS``, the only ones the launchers send.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from tests.contract.fake_pipeline_service import Recorded, RecordingServer, Reply

__all__ = ["FakeKfp"]

API = "/apis/v2beta1"
_EQUALS = (1, "EQUALS")


class FakeKfp(RecordingServer):
    """KFP's API server, single-user; ``experiments``, ``runs`` and ``recurring_runs``
    hold the stored resources by id, as the API's JSON (snake_case keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}

    def error(self, code: int, message: str) -> Any:
        """grpc-gateway's error body, as the KFP API server sends it."""
        grpc = {400: 3, 404: 5, 409: 6, 500: 13}[code]
        return {"error": message, "code": grpc, "message": message, "details": []}

    def seed_experiment(self, name: str) -> str:
        with self.lock:
            return str(self._store_experiment(name)["experiment_id"])

    def seed_run(
        self, name: str, experiment_id: str, state: str, recurring_run_id: str | None = None
    ) -> str:
        """Store a run named ``name`` in ``state`` as if someone (or a recurring run) had
        created it; its id."""
        with self.lock:
            run = {
                "run_id": str(uuid.uuid4()),
                "display_name": name,
                "experiment_id": experiment_id,
                "state": state,
                "created_at": datetime.now(UTC).isoformat(),
                **({"recurring_run_id": recurring_run_id} if recurring_run_id else {}),
            }
            self.runs[run["run_id"]] = run
            return run["run_id"]

    def seed_recurring_run(self, recurring_run: dict[str, Any]) -> str:
        with self.lock:
            return self._store_recurring_run(json.loads(json.dumps(recurring_run)))

    def route(self, request: Recorded) -> Reply:  # noqa: PLR0911 (a return per route)
        path, method = request.path, request.method
        if path == f"{API}/healthz" and method == "GET":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if path == f"{API}/experiments":
            if method == "GET":
                return self._list(request, self.experiments, "experiments")
            if method == "POST":
                return self._create_experiment(request)
        if path == f"{API}/runs":
            if method == "GET":
                return self._list(request, self.runs, "runs")
            if method == "POST":
                return self._create_run(request)
        if path == f"{API}/recurringruns":
            if method == "GET":
                # KFP's swagger really names this list field in camelCase.
                return self._list(request, self.recurring_runs, "recurringRuns")
            if method == "POST":
                return self._create_recurring_run(request)
        found = re.fullmatch(rf"{API}/recurringruns/([^/:]+)", path)
        if found and method == "DELETE":
            if self.recurring_runs.pop(found[1], None) is None:
                return 404, self.error(404, f"no recurring run {found[1]}")
            return 200, {}
        return self.unknown(request)

    # -- lists -------------------------------------------------------------------------

    def _list(self, request: Recorded, store: dict[str, dict[str, Any]], key: str) -> Reply:
        if request.param("page_token"):
            return 400, self.error(400, "the fake lists in one page")
        try:
            wanted = _display_name(request.param("filter"))
        except ValueError as exc:
            return 400, self.error(400, str(exc))
        experiment = request.param("experiment_id")
        if experiment is not None and experiment not in self.experiments:
            return 404, self.error(404, f"no experiment {experiment}")
        items = [
            item
            for item in store.values()
            if (wanted is None or item.get("display_name") == wanted)
            and (experiment is None or item.get("experiment_id") == experiment)
        ]
        return 200, ({key: items, "total_size": len(items)} if items else {})

    # -- creates -----------------------------------------------------------------------

    def _store_experiment(self, name: str) -> dict[str, Any]:
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "created_at": datetime.now(UTC).isoformat(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _create_experiment(self, request: Recorded) -> Reply:
        body = request.body
        name = body.get("display_name") if isinstance(body, dict) else None
        if not name:
            return 400, self.error(400, "an experiment needs a display_name")
        if any(e["display_name"] == name for e in self.experiments.values()):
            return 409, self.error(409, f"experiment {name!r} exists")
        return 200, self._store_experiment(name)

    def _checked(self, body: Any) -> str | None:
        """Why a run or recurring run body is refused, or None."""
        if not isinstance(body, dict) or not body.get("display_name"):
            return "a display_name is required"
        if body.get("experiment_id") not in self.experiments:
            return f"no experiment {body.get('experiment_id')!r}"
        if not body.get("pipeline_spec") and not body.get("pipeline_version_reference"):
            return "a pipeline_spec or pipeline_version_reference is required"
        return None

    def _create_run(self, request: Recorded) -> Reply:
        if problem := self._checked(request.body):
            return 400, self.error(400, problem)
        run = {
            **json.loads(json.dumps(request.body)),
            "run_id": str(uuid.uuid4()),
            "state": "PENDING",
            "created_at": datetime.now(UTC).isoformat(),
        }
        self.runs[run["run_id"]] = run
        return 200, run

    def _store_recurring_run(self, body: dict[str, Any]) -> str:
        body.update(
            recurring_run_id=str(uuid.uuid4()),
            status="ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED",
            created_at=datetime.now(UTC).isoformat(),
        )
        self.recurring_runs[body["recurring_run_id"]] = body
        return str(body["recurring_run_id"])

    def _create_recurring_run(self, request: Recorded) -> Reply:
        if problem := self._checked(request.body):
            return 400, self.error(400, problem)
        cron = ((request.body.get("trigger") or {}).get("cron_schedule") or {}).get("cron", "")
        if len(cron.split()) != 6:
            return 400, self.error(400, f"cron {cron!r}: KFP takes 6 fields, seconds first")
        identifier = self._store_recurring_run(json.loads(json.dumps(request.body)))
        return 200, self.recurring_runs[identifier]


def _display_name(raw: str | None) -> str | None:
    """The name of a ``display_name EQUALS`` filter; ValueError for any other filter."""
    if raw is None:
        return None
    predicates = json.loads(raw).get("predicates", [])
    if len(predicates) != 1:
        raise ValueError(f"the fake filters on one predicate, not {raw}")
    (predicate,) = predicates
    if predicate.get("key") != "display_name" or predicate.get("operation") not in _EQUALS:
        raise ValueError(f"the fake filters on display_name EQUALS only, not {raw}")
    value = predicate.get("stringValue", predicate.get("string_value"))
    if isinstance(value, str):
        return value
    raise ValueError(f"filter {raw}: no stringValue")
