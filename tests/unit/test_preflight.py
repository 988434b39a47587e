"""The deploy preflight (infra/preflight.py, issue 13): one line per problem, saying what to
change, before anything is created. The online checks talk to a small local fake of the three
REST APIs they read (Cloud Resource Manager, Cloud Billing, Cloud Storage), which records
what it was asked."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from retrain.config import Settings, load_settings
from tests.unit.test_deploy_dry_run import _config as deploy_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NUMBER = "123456789012"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("preflight", ROOT / "infra" / "preflight.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


preflight = _module()


class FakeGoogle:
    """Canned answers by path; every request is recorded (method, path, body)."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.good()

    def good(self) -> None:
        held = sorted(preflight.DEPLOYER_PERMISSIONS)
        self.answers = {
            "/v1/projects/acme-ml-test": (
                200,
                {"projectNumber": NUMBER, "lifecycleState": "ACTIVE"},
            ),
            "/v1/projects/acme-ml-test/billingInfo": (200, {"billingEnabled": True}),
            "/v1/projects/acme-ml-test:testIamPermissions": (200, {"permissions": held}),
        }

    def answer(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path, body))
        bare = path.split("?", maxsplit=1)[0]
        if bare in self.answers:
            return self.answers[bare]
        if bare.startswith("/storage/v1/b/"):
            return 404, {"error": {"code": 404, "message": "The specified bucket does not exist."}}
        return 500, {"error": {"message": f"the fake knows no {bare}"}}


@pytest.fixture
def google() -> Iterator[tuple[FakeGoogle, Any]]:
    fake = FakeGoogle()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            assert self.headers["Authorization"] == "Bearer test-token"
            status, payload = fake.answer(method, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply("GET")

        def do_POST(self) -> None:
            self._reply("POST")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    api = preflight.GoogleApi("test-token", dict.fromkeys(preflight.ENDPOINTS, url))
    try:
        yield fake, api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _settings(tmp_path: Path, **changes: Any) -> Settings:
    return load_settings(deploy_config(tmp_path, **changes))


def _problems(settings: Settings, api: Any) -> list[str]:
    return list(preflight.offline_problems(settings)) + list(
        preflight.online_problems(settings, api)
    )


def test_a_deployable_project_passes(tmp_path: Path, google: tuple[FakeGoogle, Any]) -> None:
    fake, api = google
    assert _problems(_settings(tmp_path), api) == []
    asked = [f"{m} {p.split('?')[0]}" for m, p, _ in fake.requests]
    assert asked == [
        "GET /v1/projects/acme-ml-test",
        "GET /v1/projects/acme-ml-test/billingInfo",
        "POST /v1/projects/acme-ml-test:testIamPermissions",
        "GET /storage/v1/b/acme-data",
        "GET /storage/v1/b/acme-artifacts",
        "GET /storage/v1/b/acme-artifacts-registry",
        "GET /storage/v1/b/acme-artifacts-access-logs",
    ]
    assert fake.requests[2][2] == {"permissions": sorted(preflight.DEPLOYER_PERMISSIONS)}
    # --offline prints the same requests (and the notification listing, asked only when
    # the data bucket exists).
    planned = [" ".join(r.split()[::2]) for r in preflight.planned_requests(_settings(tmp_path))]
    assert [a.split()[1] for a in asked] == [p.split()[1] for p in planned[:7]]


def test_a_missing_project_is_one_line(tmp_path: Path, google: tuple[FakeGoogle, Any]) -> None:
    fake, api = google
    fake.answers["/v1/projects/acme-ml-test"] = (403, {"error": {"message": "denied"}})
    problems = _problems(_settings(tmp_path), api)
    assert problems == [
        "project: 'acme-ml-test' was not found or you cannot see it (HTTP 403: denied); set "
        "project: to your project's id (`gcloud projects list`), or `gcloud auth login` as an "
        "account that can see it"
    ]
    assert len(fake.requests) == 1  # nothing else is asked about a project we cannot see


def test_each_problem_says_what_to_change(tmp_path: Path, google: tuple[FakeGoogle, Any]) -> None:
    fake, api = google
    fake.answers["/v1/projects/acme-ml-test/billingInfo"] = (200, {"billingEnabled": False})
    fake.answers["/v1/projects/acme-ml-test:testIamPermissions"] = (
        200,
        {"permissions": ["storage.buckets.create", "pubsub.topics.create"]},
    )
    fake.answers["/storage/v1/b/acme-data"] = (403, {"error": {"message": "no access"}})
    fake.answers["/storage/v1/b/acme-artifacts"] = (200, {"projectNumber": "999"})
    fake.answers["/storage/v1/b/acme-artifacts-registry"] = (200, {"projectNumber": NUMBER})
    problems = _problems(_settings(tmp_path, backend="local"), api)
    text = "\n".join(problems)
    assert problems[0].startswith("backend: local runs pipelines on this machine")
    assert "billing: 'acme-ml-test' has no billing account; link one: gcloud billing" in text
    roles = [p for p in problems if p.startswith("roles: ")]
    # One line per role to grant, each naming the permissions it brings.
    assert len(roles) == len(set(preflight.DEPLOYER_PERMISSIONS.values())) - 1
    assert any("--role=roles/iam.serviceAccountAdmin" in p for p in roles)
    assert not any("roles/storage.admin" in p for p in roles)  # held
    assert "buckets.data: the bucket name 'acme-data' is taken by another project" in text
    assert "buckets.artifacts: the bucket name 'acme-artifacts' is taken by project number 999" in (
        text
    )
    assert "acme-artifacts-registry" not in text  # ours already: fine
    assert all("\n" not in p for p in problems)


def test_a_full_data_bucket_has_no_room(tmp_path: Path, google: tuple[FakeGoogle, Any]) -> None:
    fake, api = google
    fake.answers["/storage/v1/b/acme-data"] = (200, {"projectNumber": NUMBER})
    others = [
        {"topic": f"//pubsub.googleapis.com/projects/acme-ml-test/topics/t{i}"} for i in range(9)
    ]
    ours = {
        "topic": "//pubsub.googleapis.com/projects/acme-ml-test/topics/data-arrivals",
        "event_types": ["OBJECT_FINALIZE"],
    }
    deletes = {"topic": "//pubsub.googleapis.com/x", "event_types": ["OBJECT_DELETE"]}
    listing = "/storage/v1/b/acme-data/notificationConfigs"
    fake.answers[listing] = (200, {"items": [*others, ours, deletes]})
    assert _problems(_settings(tmp_path), api) == []  # 9 others, and ours (a second deploy)
    fake.answers[listing] = (200, {"items": [*others, {"topic": "//x", "event_types": []}]})
    (problem,) = _problems(_settings(tmp_path), api)
    assert problem.startswith("buckets.data: 'acme-data' already has 10 OBJECT_FINALIZE")


def test_offline_checks(tmp_path: Path) -> None:
    assert preflight.offline_problems(_settings(tmp_path)) == []
    (problem,) = preflight.offline_problems(_settings(tmp_path, region="US-Central1"))
    assert problem.startswith("region: 'US-Central1' is not a Google Cloud region name")


def test_main_prints_config_problems_one_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    raw = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    raw["gcp"]["endpoint"]["deploy_wait_seconds"] = 500
    raw["models"]["rainfall"]["coalesce_seconds"] = 600
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert preflight.main(["--config", str(path), "--offline"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert any("gcp.endpoint.deploy_wait_seconds" in line for line in lines)
    assert any("models.rainfall.coalesce_seconds" in line for line in lines)
