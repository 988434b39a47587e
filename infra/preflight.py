"""The deploy preflight: what ``make deploy`` (scripts/deploy) checks before it creates anything.

Each problem is printed as one line: what is wrong, and what to change. The checks:

- offline, from the config file (through ``retrain.config``, so every rule of ``retrain config
  check`` holds too): the backend can deploy, the region is a region name;
- online, read-only, with the deployer's gcloud credentials (``gcloud auth
  print-access-token``): the project exists and is active, billing is enabled on it, the
  deployer holds the permissions that the deploy uses, each bucket name is free or already
  this project's, and the data bucket has room for our notification (a bucket takes at most
  10 notification configurations for one event type).

``--offline`` (``make deploy DRY_RUN=1``) runs the offline checks and prints the requests the
online ones would send. Exit status: 0 when nothing is wrong, 1 otherwise, 2 on bad usage.

    python infra/preflight.py [--config retrain.yaml] [--offline]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from the repository root
    sys.path.insert(0, str(ROOT))

from retrain.config import ConfigError, Settings, load_settings  # noqa: E402

__all__ = [
    "DEPLOYER_PERMISSIONS",
    "ENDPOINTS",
    "GoogleApi",
    "access_log_bucket",
    "main",
    "offline_problems",
    "online_problems",
    "planned_requests",
]

# The permissions the deploy uses, each with the predefined role that grants it (what the
# failure line tells the user to ask for). Owner has them all.
DEPLOYER_PERMISSIONS: dict[str, str] = {
    "serviceusage.services.enable": "roles/serviceusage.serviceUsageAdmin",
    "iam.serviceAccounts.create": "roles/iam.serviceAccountAdmin",
    "iam.serviceAccounts.actAs": "roles/iam.serviceAccountUser",
    "resourcemanager.projects.setIamPolicy": "roles/resourcemanager.projectIamAdmin",
    "storage.buckets.create": "roles/storage.admin",
    "pubsub.topics.create": "roles/pubsub.admin",
    "pubsub.subscriptions.setIamPolicy": "roles/pubsub.admin",
    "cloudfunctions.functions.create": "roles/cloudfunctions.admin",
    "run.services.setIamPolicy": "roles/run.admin",
    "eventarc.triggers.get": "roles/eventarc.admin",
    "cloudscheduler.jobs.create": "roles/cloudscheduler.admin",
    "artifactregistry.repositories.create": "roles/artifactregistry.admin",
    "cloudbuild.builds.create": "roles/cloudbuild.builds.editor",
    "datastore.databases.create": "roles/datastore.owner",
}

# The REST endpoints the online checks read; tests point them at a local fake.
ENDPOINTS: dict[str, str] = {
    "resourcemanager": "https://cloudresourcemanager.googleapis.com",
    "billing": "https://cloudbilling.googleapis.com",
    "storage": "https://storage.googleapis.com",
}

# The most notification configurations a bucket takes for one event type (Cloud Storage).
NOTIFICATIONS_PER_EVENT_TYPE = 10

_REGION = re.compile(r"^[a-z]+(-[a-z]+)+[0-9]+$")


def access_log_bucket(settings: Settings) -> str:
    """The usage-log bucket's name, as infra/terraform/storage.tf derives it."""
    return f"{settings.buckets.artifacts[:51]}-access-logs"


def _buckets(settings: Settings) -> dict[str, str]:
    """retrain.yaml key -> bucket name, for every bucket Terraform creates."""
    return {
        "buckets.data": settings.buckets.data,
        "buckets.artifacts": settings.buckets.artifacts,
        "buckets.registry": settings.buckets.models,
        "buckets.artifacts (its usage-log bucket)": access_log_bucket(settings),
    }


def offline_problems(settings: Settings) -> list[str]:
    """What the config file alone says cannot deploy."""
    problems = []
    if settings.backend == "local":
        problems.append(
            "backend: local runs pipelines on this machine and cannot deploy; set backend: "
            "vertex (or kfp with gcp.kfp.host) in the config file"
        )
    if not _REGION.match(settings.region):
        problems.append(
            f"region: {settings.region!r} is not a Google Cloud region name (e.g. us-central1, "
            "europe-west4); set one where Vertex AI, Cloud Functions and Eventarc run"
        )
    return problems


@dataclass
class Response:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class GoogleApi:
    """Read-only REST calls with a bearer token; ``endpoints`` overrides :data:`ENDPOINTS`."""

    def __init__(self, token: str, endpoints: Mapping[str, str] | None = None) -> None:
        self._token = token
        self._endpoints = {**ENDPOINTS, **(endpoints or {})}

    def call(self, api: str, path: str, body: dict[str, Any] | None = None) -> Response:
        request = urllib.request.Request(  # noqa: S310 (https, or a test's loopback fake)
            self._endpoints[api] + path,
            data=None if body is None else json.dumps(body).encode(),
            method="GET" if body is None else "POST",
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
                return Response(answer.status, json.loads(answer.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read() or b"{}")
            except ValueError:
                detail = {}
            return Response(exc.code, detail if isinstance(detail, dict) else {})


def _error(response: Response) -> str:
    message = response.body.get("error", {})
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    return f"HTTP {response.status}" + (f": {text}" if text else "")


def planned_requests(settings: Settings) -> list[str]:
    """The online checks' requests, in order, as ``--offline`` prints them."""
    project = settings.project
    requests = [
        f"GET  resourcemanager /v1/projects/{project}",
        f"GET  billing /v1/projects/{project}/billingInfo",
        f"POST resourcemanager /v1/projects/{project}:testIamPermissions "
        f"({len(DEPLOYER_PERMISSIONS)} permissions)",
    ]
    requests += [f"GET  storage /storage/v1/b/{name}" for name in _buckets(settings).values()]
    requests.append(f"GET  storage /storage/v1/b/{settings.buckets.data}/notificationConfigs")
    return requests


def online_problems(settings: Settings, api: GoogleApi) -> Iterator[str]:
    """What Google Cloud says stands in the way, one line each; read-only."""
    project = settings.project
    found = api.call("resourcemanager", f"/v1/projects/{project}")
    if found.status != 200:
        yield (
            f"project: {project!r} was not found or you cannot see it ({_error(found)}); set "
            "project: to your project's id (`gcloud projects list`), or `gcloud auth login` "
            "as an account that can see it"
        )
        return  # everything below is about that project
    if found.body.get("lifecycleState", "ACTIVE") != "ACTIVE":
        yield f"project: {project!r} is {found.body['lifecycleState']}; restore it or pick another"
    yield from _billing(project, api)
    yield from _roles(project, api)
    yield from _bucket_names(settings, str(found.body.get("projectNumber", "")), api)


def _billing(project: str, api: GoogleApi) -> Iterator[str]:
    billing = api.call("billing", f"/v1/projects/{project}/billingInfo")
    if billing.status != 200:
        yield (
            f"billing: cannot tell whether {project!r} has billing ({_error(billing)}); ask a "
            "billing admin, or link an account: gcloud billing projects link "
            f"{project} --billing-account=ACCOUNT_ID"
        )
    elif not billing.body.get("billingEnabled"):
        yield (
            f"billing: {project!r} has no billing account; link one: gcloud billing projects "
            f"link {project} --billing-account=ACCOUNT_ID (`gcloud billing accounts list`)"
        )


def _roles(project: str, api: GoogleApi) -> Iterator[str]:
    """testIamPermissions counts every way a permission reaches the caller (groups, folder,
    organisation), which reading the project's policy would not."""
    wanted = sorted(DEPLOYER_PERMISSIONS)
    tested = api.call(
        "resourcemanager", f"/v1/projects/{project}:testIamPermissions", {"permissions": wanted}
    )
    if tested.status != 200:
        yield f"roles: cannot test your permissions on {project!r} ({_error(tested)})"
        return
    held = set(tested.body.get("permissions", []))
    missing: dict[str, list[str]] = {}
    for permission in wanted:
        if permission not in held:
            missing.setdefault(DEPLOYER_PERMISSIONS[permission], []).append(permission)
    for role, permissions in missing.items():
        yield (
            f"roles: you lack {', '.join(permissions)} on {project!r}; have {role} granted "
            f"to you there (or Owner): gcloud projects add-iam-policy-binding {project} "
            f"--member=user:YOU --role={role}"
        )


def _bucket_names(settings: Settings, number: str, api: GoogleApi) -> Iterator[str]:
    """Each name free (Terraform creates it) or already this project's (a second deploy)."""
    data_is_ours = False
    for key, name in _buckets(settings).items():
        bucket = api.call("storage", f"/storage/v1/b/{name}?fields=projectNumber")
        if bucket.status == 404:
            continue
        owner = str(bucket.body.get("projectNumber", ""))
        if bucket.status == 200 and owner == number:
            data_is_ours = data_is_ours or name == settings.buckets.data
            continue
        whose = f"project number {owner}" if bucket.status == 200 else "another project"
        yield (
            f"{key}: the bucket name {name!r} is taken by {whose} (names are global); choose "
            f"another name for {key.split(' ')[0]} in the config file"
        )
    if data_is_ours:
        yield from _notification_room(settings, api)


def _notification_room(settings: Settings, api: GoogleApi) -> Iterator[str]:
    """Our one OBJECT_FINALIZE notification must fit next to those already on the bucket."""
    name = settings.buckets.data
    listed = api.call("storage", f"/storage/v1/b/{name}/notificationConfigs")
    if listed.status != 200:
        yield f"buckets.data: cannot list the notifications of {name!r} ({_error(listed)})"
        return
    topic = f"//pubsub.googleapis.com/projects/{settings.project}/topics/"
    topic += settings.topics.data_arrivals
    others = [
        item
        for item in listed.body.get("items", [])
        if item.get("topic") != topic
        and ("OBJECT_FINALIZE" in item.get("event_types", []) or not item.get("event_types"))
    ]
    if len(others) >= NOTIFICATIONS_PER_EVENT_TYPE:
        yield (
            f"buckets.data: {name!r} already has {len(others)} OBJECT_FINALIZE notifications and "
            f"takes at most {NOTIFICATIONS_PER_EVENT_TYPE}; delete one (gcloud storage buckets "
            f"notifications list gs://{name}) or use another data bucket"
        )


def _gcloud_token() -> str:
    try:
        done = subprocess.run(
            ["gcloud", "auth", "print-access-token"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(
            "preflight: no gcloud credentials (`gcloud auth print-access-token` failed); run "
            f"`gcloud auth login` first ({exc})"
        ) from exc
    return done.stdout.strip()


def main(argv: list[str] | None = None, token: Callable[[], str] = _gcloud_token) -> int:
    parser = argparse.ArgumentParser(
        prog="infra/preflight.py",
        description="Check that the config file can deploy to Google Cloud, before anything is "
        "created. Prints one line per problem: what is wrong and what to change.",
    )
    parser.add_argument("--config", type=Path, default=Path("retrain.yaml"), help="the config")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="check the config file only, and print the requests the online checks would send",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for key, reason in exc.problems:
            print(f"preflight: {args.config}: {key}: {reason}", file=sys.stderr)  # noqa: T201
        return 1
    problems = offline_problems(settings)
    if args.offline:
        for request in planned_requests(settings):
            print(f"  would check: {request}")  # noqa: T201
    else:
        problems += list(online_problems(settings, GoogleApi(token())))
    for problem in problems:
        print(f"preflight: {problem}", file=sys.stderr)  # noqa: T201
    if problems:
        return 1
    models = len(settings.models)
    print(  # noqa: T201
        f"preflight: {settings.project} ({settings.region}, backend {settings.backend}, "
        f"{models} model{'s' * (models != 1)}): ok" + (" offline" if args.offline else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
