"""`make deploy`'s order on a new project (issue 13), seen without Google Cloud.

``scripts/deploy`` with ``DRY_RUN=1`` prints every command and the Terraform resources each
apply covers: the stages must come as APIs → service agents → accounts → image → the rest →
dead letters, and the last apply must cover every resource of infra/terraform. The Terraform
itself must say the same order: every resource waits, directly or through what it references,
for the APIs; the functions and the Pub/Sub agent's bindings wait for the service agents.
``retrying`` (sourced from the script) retries known-transient errors only, a bounded number
of times.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_terraform import TERRAFORM, Terraform, load_terraform

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "scripts" / "deploy"


def _config(tmp_path: Path, **changes: Any) -> Path:
    raw = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    raw.update(
        backend="vertex",
        project="acme-ml-test",
        buckets={"data": "acme-data", "artifacts": "acme-artifacts"},
    )
    raw.update(changes)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _dry_run(config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DRY_RUN": "1", "CONFIG": str(config), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(DEPLOY)], capture_output=True, text=True, env=env, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def terraform() -> Terraform:
    return load_terraform(TERRAFORM)


def _targets_stage(targets: list[str]) -> str:
    if not targets:
        return "everything else"
    if targets == ["google_project_service.enabled"]:
        return "apis"
    if all("service_identity" in t or "service_account.gcs" in t for t in targets):
        return "agents"
    if any(t.startswith("google_service_account.") for t in targets):
        return "accounts"
    return f"unexpected targets {targets}"


_STAGES = {
    "infra/preflight.py": "preflight",
    " init ": "init",
    "gcloud builds submit": "image",
    "dead_letter_commands": "dead letters",
}


def _stage_of(command: str) -> str | None:
    for marker, stage in _STAGES.items():
        if marker in f"{command} ":
            return stage
    if " apply " in command:
        return _targets_stage(re.findall(r"-target=(\S+)", command))
    return None


def test_dry_run_prints_the_stages_in_order(tmp_path: Path, terraform: Terraform) -> None:
    done = _dry_run(_config(tmp_path))
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    stages = [s for s in map(_stage_of, commands) if s is not None]
    assert stages == [
        "preflight",
        "init",
        "apis",
        "agents",
        "accounts",
        "image",
        "everything else",
        "dead letters",
    ], commands
    # Every apply reads the same config file, and says what it covers.
    applies = [c for c in commands if " apply " in c]
    assert all(f"-var=config_path={tmp_path / 'deploy.yaml'}" in c for c in applies)
    assert done.stdout.count("    resources:") == len(applies) == 4
    # The last apply covers every resource and data source of infra/terraform.
    listed = done.stdout.rsplit("    resources:", 1)[1].split("\n==", 1)[0].split()
    declared = {f"{t}.{n}" for t, n in terraform.resources}
    declared |= {f"data.{t}.{n}" for t, n in terraform.data}
    assert set(listed) == declared
    # Nothing ran: the dry run printed the online checks instead of making them.
    assert "would check: GET  resourcemanager /v1/projects/acme-ml-test" in done.stdout
    assert "ok offline" in done.stdout


def test_make_deploy_dry_run_goes_straight_to_the_plan(tmp_path: Path) -> None:
    """`make deploy DRY_RUN=1`, as the docs give it: no `retrain package` (which builds,
    and refuses the shipped backend: local) before the script prints its plan."""
    config = _config(tmp_path)
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", "install", "deploy", "DRY_RUN=1",
         f"CONFIG={config}", f"PYTHON={sys.executable}"],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "retrain package" not in done.stdout + done.stderr
    assert "== 0/6 preflight" in done.stdout
    assert "== 5/6 everything else" in done.stdout


def test_dry_run_of_an_undeployable_config_says_what_to_change(tmp_path: Path) -> None:
    done = _dry_run(_config(tmp_path, backend="local", region="us-central"))
    assert done.returncode == 1
    problems = [line for line in done.stderr.splitlines() if line.startswith("preflight: ")]
    assert len(problems) == 2, done.stderr
    assert "backend: local" in problems[0]
    assert "set backend: vertex" in problems[0]
    assert "region: 'us-central'" in problems[1]
    assert "a deploy would stop here, having created nothing" in done.stdout
    assert "== 1/6 APIs" in done.stdout  # the dry run still shows the plan


# --- the order in the Terraform itself ---------------------------------------------------------

_REF = re.compile(r"(?<![\w.])(data\.)?(google_\w+)\.(\w+)|(?<![\w.])local\.(\w+)")


def _direct(tf: Terraform, value: Any, seen_locals: set[str]) -> set[str]:
    """Resource addresses that ``value`` references, following locals."""
    found: set[str] = set()
    for ref in _REF.finditer(json.dumps(value, default=str)):
        if ref[4]:
            if ref[4] in seen_locals or ref[4] not in tf.locals:
                continue
            seen_locals.add(ref[4])
            found |= _direct(tf, tf.locals[ref[4]], seen_locals)
        else:
            found.add(f"{ref[1] or ''}{ref[2]}.{ref[3]}")
    return found


def _graph(tf: Terraform) -> dict[str, set[str]]:
    bodies = {f"{t}.{n}": b for (t, n), b in tf.resources.items()}
    bodies |= {f"data.{t}.{n}": b for (t, n), b in tf.data.items()}
    return {
        address: {
            d
            for d in _direct(tf, {k: v for k, v in body.items() if k != "__comments__"}, set())
            if d != address and d in bodies
        }
        for address, body in bodies.items()
    }


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    todo, seen = [start], set()
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, set())
    return False


APIS = "google_project_service.enabled"
AGENTS = "google_project_service_identity.agent"


def order_problems(tf: Terraform) -> list[str]:
    graph = _graph(tf)
    problems = [
        f"{address} does not wait for the APIs ({APIS})"
        for address in sorted(graph)
        if address != APIS and not _reaches(graph, address, APIS)
    ]
    services = tf.resources["google_project_service", "enabled"]["for_each"]
    problems += [
        f"{api} is not enabled first"
        for api in ("iam.googleapis.com", "cloudresourcemanager.googleapis.com")
        if f'"{api}"' not in services
    ]
    agents = tf.resources.get(("google_project_service_identity", "agent"), {})
    named = json.dumps(agents)
    if agents.get("for_each") == "${local.service_agents}":
        named = json.dumps(tf.locals.get("service_agents"))
    for service in ("eventarc.googleapis.com", "pubsub.googleapis.com"):
        if service not in named:
            problems.append(f"no explicit service agent for {service}")
    waiting = [a for a, body in tf.resources.items() if "pubsub_service_agent" in json.dumps(body)]
    waiting.append(("google_cloudfunctions2_function", "fn"))
    problems += [
        f"{'.'.join(key)} does not wait for the service agents ({AGENTS})"
        for key in waiting
        if not _reaches(graph, ".".join(key), AGENTS)
    ]
    return problems


def test_terraform_waits_for_apis_and_agents(terraform: Terraform) -> None:
    assert order_problems(terraform) == []


def test_order_check_catches(terraform: Terraform) -> None:
    import copy  # noqa: PLC0415

    broken = copy.deepcopy(terraform)
    del broken.resources["google_service_account", "build"]["depends_on"]
    del broken.data["google_project", "this"]["depends_on"]
    del broken.resources["google_pubsub_topic_iam_member", "pubsub_dead_letters"]["depends_on"]
    problems = order_problems(broken)
    assert "google_service_account.build does not wait for the APIs" in " ".join(problems)
    assert any(p.startswith("data.google_project.this does not wait") for p in problems)
    assert any(p.startswith("google_pubsub_topic_iam_member.pubsub_dead_letters") for p in problems)


# --- bounded retries of known-transient errors only -------------------------------------------


def _retrying(tmp_path: Path, outputs: list[tuple[int, str]]) -> tuple[int, int, str]:
    """Source scripts/deploy, run ``retrying`` on a command that answers ``outputs`` in turn;
    (exit status, attempts, output)."""
    script = tmp_path / "step"
    count = tmp_path / "count"
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(outputs), encoding="utf-8")
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        f"count = pathlib.Path({str(count)!r})\n"
        "n = int(count.read_text()) if count.exists() else 0\n"
        "count.write_text(str(n + 1))\n"
        f"rc, text = json.loads(pathlib.Path({str(answers)!r}).read_text())[n]\n"
        "print(text)\n"
        "sys.exit(rc)\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    done = subprocess.run(
        ["bash", "-c", f'source "{DEPLOY}"; RETRY_SECONDS=0 RETRY_ATTEMPTS=3 retrying "{script}"'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    attempts = int(count.read_text()) if count.exists() else 0
    return done.returncode, attempts, done.stdout + done.stderr


EVENTARC = (
    'Error 400: Validation failed for trigger: Invalid resource state for "": Permission '
    "denied while using the Eventarc Service Agent. If you recently started to use Eventarc..."
)
DISABLED = (
    "Error 403: Identity and Access Management (IAM) API has not been used in project "
    "123456789 before or it is disabled. ... reason: SERVICE_DISABLED"
)


def test_a_transient_error_is_retried(tmp_path: Path) -> None:
    rc, attempts, output = _retrying(tmp_path, [(1, EVENTARC), (1, DISABLED), (0, "Apply!")])
    assert (rc, attempts) == (0, 3), output
    assert "still propagating (Permission denied while using the Eventarc Service Agent)" in output


def test_other_errors_stop_at_once(tmp_path: Path) -> None:
    rc, attempts, output = _retrying(tmp_path, [(1, "Error 409: already exists"), (0, "")])
    assert (rc, attempts) == (1, 1), output
    assert "When a step fails" in output


def test_retries_are_bounded(tmp_path: Path) -> None:
    rc, attempts, output = _retrying(tmp_path, [(1, EVENTARC)] * 5)
    assert (rc, attempts) == (1, 3), output
