"""Terraform and code name the same topology, in both directions.

Terraform is not run here (nor installed): every .tf file of infra/terraform is parsed with
python-hcl2, and its locals are evaluated against a config file by a small evaluator that
knows the few forms they use: references, ``try``, ``merge``, ``coalesce`` and string
templates. The locals built with ``for`` expressions are pinned to their exact text and
mirrored in Python below; change one and this test says which mirror to update. Resources
are then checked to be ``for_each`` over those locals, wired to the right topics, and to be
the only resources of their kinds, so Terraform has nothing the code does not. Last, the IAM
bindings are read for who can write the registry bucket and the Firestore database (issue 11):
the functions' account, and never the pipelines' account.
"""

from __future__ import annotations

import ast
import copy
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from croniter import croniter
from hcl2.utils import SerializationOptions

from retrain.config import FUNCTION_TOPICS, Settings, load_settings
from retrain.messages import ScheduleMessage, decode
from retrain.scheduler import jobs, schedule_message
from retrain.topology import DEAD_LETTER_SUFFIX, topology

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "infra" / "terraform"
CONFIG = ROOT / "retrain.yaml"

_OPTIONS = SerializationOptions(strip_string_quotes=True, explicit_blocks=False)


# --- reading the .tf files -----------------------------------------------------------------


@dataclass
class Terraform:
    locals: dict[str, Any] = field(default_factory=dict)
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)  # file name -> source


def load_terraform(folder: Path) -> Terraform:
    tf = Terraform()
    for path in sorted(folder.glob("*.tf")):
        source = path.read_text(encoding="utf-8")
        tf.text[path.name] = source
        document: dict[str, Any] = hcl2.loads(source, serialization_options=_OPTIONS)
        for block in document.get("locals", []):
            for name, value in block.items():
                if not name.startswith("__"):
                    assert name not in tf.locals, f"local.{name} is defined twice"
                    tf.locals[name] = value
        for kind, target in (("variable", tf.variables), ("output", tf.outputs)):
            for block in document.get(kind, []):
                target.update(block)
        for kind, blocks in (("resource", tf.resources), ("data", tf.data)):
            for block in document.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        assert (rtype, name) not in blocks, f"{kind} {rtype}.{name} twice"
                        blocks[rtype, name] = body
    return tf


@pytest.fixture(scope="module")
def terraform() -> Terraform:
    return load_terraform(TERRAFORM)


def lookup(body: Mapping[str, Any], dotted: str) -> Any:
    """``build_config.entry_point`` in a resource body; a nested block is a list of one."""
    value: Any = body
    for part in dotted.split("."):
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def comments(body: Mapping[str, Any]) -> list[str]:
    return [str(c.get("value", "")).strip() for c in body.get("__comments__", [])]


# --- a small evaluator for the locals --------------------------------------------------------


class Unsupported(Exception):
    """An expression this evaluator does not know; extend it, or pin the local."""


class _Missing(Exception):
    """A reference to an attribute that is not there: what ``try()`` catches."""


_CLOSER = {"(": ")", "[": "]", "{": "}"}


def _skip_string(text: str, i: int) -> int:
    """``text[i]`` opens a string; the index just past its closing quote."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        elif text.startswith("${", i):
            i = _skip_brackets(text, i + 1)
        else:
            i += 1
    raise Unsupported(f"unterminated string in {text!r}")


def _skip_brackets(text: str, i: int) -> int:
    """``text[i]`` is one of ``([{``; the index just past the bracket that closes it."""
    stack = [_CLOSER[text[i]]]
    i += 1
    while stack:
        if i >= len(text):
            raise Unsupported(f"unbalanced brackets in {text!r}")
        char = text[i]
        if char == '"':
            i = _skip_string(text, i)
            continue
        if char in _CLOSER:
            stack.append(_CLOSER[char])
        elif char == stack[-1]:
            stack.pop()
        i += 1
    return i


def _split_arguments(text: str) -> list[str]:
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] == '"':
            i = _skip_string(text, i)
        elif text[i] in _CLOSER:
            i = _skip_brackets(text, i)
        elif text[i] == ",":
            parts.append(text[start:i].strip())
            start = i = i + 1
        else:
            i += 1
    tail = text[start:].strip()
    return [*parts, tail] if tail else parts


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    raise Unsupported(f"cannot put {value!r} in a string")


def _normalize(expression: str) -> str:
    return " ".join(expression.split())


class Evaluator:
    """Evaluates ``local.*`` of the parsed .tf files for one config file's contents."""

    def __init__(self, tf: Terraform, config: dict[str, Any]) -> None:
        self.tf = tf
        self.config = config
        self._cache: dict[str, Any] = {}

    def local(self, name: str) -> Any:
        if name not in self._cache:
            if name not in self.tf.locals:
                raise _Missing(f"local.{name}")
            raw = self.tf.locals[name]
            if name in PINNED:
                text, mirror = PINNED[name]
                if not isinstance(raw, str) or _normalize(raw) != _normalize(text):
                    raise Unsupported(
                        f"local.{name} is no longer {text!r} but {raw!r}: update its mirror "
                        "in PINNED (tests/unit/test_terraform.py) to what the new text computes"
                    )
                self._cache[name] = mirror(self)
            else:
                self._cache[name] = self.value(raw)
        return self._cache[name]

    def value(self, raw: Any) -> Any:
        if isinstance(raw, dict):
            return {k: self.value(v) for k, v in raw.items() if not k.startswith("__")}
        if isinstance(raw, list):
            return [self.value(v) for v in raw]
        if not isinstance(raw, str):
            return raw
        if raw.startswith("${") and _skip_brackets(raw, 1) == len(raw):
            return self.expression(raw[2:-1])
        return self.template(raw)

    def template(self, text: str) -> str:
        out, i = [], 0
        while (start := text.find("${", i)) >= 0:
            end = _skip_brackets(text, start + 1)
            out += [text[i:start], _render(self.expression(text[start + 2 : end - 1]))]
            i = end
        return "".join([*out, text[i:]])

    def expression(self, text: str) -> Any:
        text = text.strip()
        if text == "null":
            return None
        if text == "{}":
            return {}
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if text.startswith('"') and _skip_string(text, 0) == len(text):
            return self.template(text[1:-1])
        if re.fullmatch(r"local\.\w+(\.\w+)*", text):
            _, name, *attributes = text.split(".")
            value = self.local(name)
            for attribute in attributes:
                if not isinstance(value, Mapping) or attribute not in value:
                    raise _Missing(text)
                value = value[attribute]
            return value
        call = re.fullmatch(r"(\w+)\((.*)\)", text, re.DOTALL)
        if call and _skip_brackets(text, len(call[1])) == len(text):
            return self.call(call[1], _split_arguments(call[2]))
        raise Unsupported(text)

    def call(self, function: str, arguments: list[str]) -> Any:
        if function == "try":
            for argument in arguments:
                try:
                    return self.expression(argument)
                except _Missing:
                    continue
            raise _Missing(f"try({', '.join(arguments)})")
        values = [self.expression(a) for a in arguments]
        if function == "merge":
            merged: dict[str, Any] = {}
            for value in values:
                if value is not None:
                    merged |= value
            return merged
        if function == "coalesce":
            return next(v for v in values if v is not None and v != "")
        raise Unsupported(f"{function}(...)")


Mirror = Callable[[Evaluator], Any]


def _pull_subscriptions(ev: Evaluator) -> dict[str, str]:
    decisions = ev.local("topics")["model_decisions"]
    pulls = {topic: topic for topic in ev.local("dead_letter_topics").values()}
    return pulls | {f"{decisions}-{s}": decisions for s in ev.local("decision_pull_suffixes")}


# Locals built with `for` expressions: their exact text, and what that text computes.
PINNED: dict[str, tuple[str, Mirror]] = {
    "config": (
        "${yamldecode(file(var.config_path))}",
        lambda ev: ev.config,
    ),
    "dead_letter_topics": (
        '${{for field, topic in local.topics : field => "${topic}${local.dead_letter_suffix}"}}',
        lambda ev: {f: t + ev.local("dead_letter_suffix") for f, t in ev.local("topics").items()},
    ),
    "pull_subscriptions": (
        "${merge({for field, topic in local.dead_letter_topics : topic => topic}, "
        '{for suffix in local.decision_pull_suffixes : "${local.topics.model_decisions}-${suffix}"'
        " => local.topics.model_decisions})}",
        _pull_subscriptions,
    ),
    "function_names": (
        "${{for entry_point, field in local.function_topics : entry_point => "
        '"retrain-${replace(entry_point, "_", "-")}"}}',
        lambda ev: {e: "retrain-" + e.replace("_", "-") for e in ev.local("function_topics")},
    ),
    "pipeline_objects": (
        '${{for model, spec in local.models : model => "pipelines/${model}.yaml"}}',
        lambda ev: {m: f"pipelines/{m}.yaml" for m in ev.local("models")},
    ),
    "schedules": (
        "${{for model, spec in local.models : model => {cron = spec.schedule.cron, "
        'time_zone = try(spec.schedule.timezone, "UTC")} if try(spec.schedule, null) != null '
        '&& try(spec.schedule.via, "cloud_scheduler") == "cloud_scheduler"}}',
        lambda ev: {
            m: {"cron": s["schedule"]["cron"], "time_zone": s["schedule"].get("timezone", "UTC")}
            for m, s in ev.local("models").items()
            if s.get("schedule") is not None
            and s["schedule"].get("via", "cloud_scheduler") == "cloud_scheduler"
        },
    ),
    # Arithmetic and a conditional, which the evaluator does not know: pinned likewise.
    "sweep_minutes": (
        "${max(1, ceil(local.sweep_seconds / 60))}",
        lambda ev: max(1, math.ceil(ev.local("sweep_seconds") / 60)),
    ),
    "sweep_cron": (
        '${local.sweep_minutes >= 60 ? "0 * * * *" : "*/${local.sweep_minutes} * * * *"}',
        lambda ev: (
            "0 * * * *"
            if ev.local("sweep_minutes") >= 60
            else f"*/{ev.local('sweep_minutes')} * * * *"
        ),
    ),
    "topic_ids": (
        "${merge({for field, topic in google_pubsub_topic.topic : topic.name => topic.id}, "
        "{for field, topic in google_pubsub_topic.dead_letter : topic.name => topic.id})}",
        # google_pubsub_topic.topic is for_each over local.topics (name = each.value), and
        # .dead_letter over local.dead_letter_topics: the wiring test checks both.
        lambda ev: {
            name: f"projects/{ev.local('project')}/topics/{name}"
            for names in (ev.local("topics"), ev.local("dead_letter_topics"))
            for name in names.values()
        },
    ),
}


# --- what each side names ------------------------------------------------------------------


def terraform_names(tf: Terraform, config: dict[str, Any]) -> dict[str, Any]:
    ev = Evaluator(tf, config)
    topics: dict[str, str] = ev.local("topics")
    dead_letters: dict[str, str] = ev.local("dead_letter_topics")
    functions: dict[str, str] = ev.local("function_topics")
    artifacts = ev.local("artifacts_bucket")
    return {
        "project": ev.local("project"),
        "region": ev.local("region"),
        "buckets": {
            "data": ev.local("data_bucket"),
            "artifacts": artifacts,
            "registry": ev.local("registry_bucket"),
        },
        "database": ev.local("database"),
        "sweep cron": ev.local("sweep_cron"),
        "topics by field": topics,
        "all topics": sorted({*topics.values(), *dead_letters.values()}),
        "pull subscriptions": ev.local("pull_subscriptions"),
        # Each pull subscription's topic is local.topic_ids[<topic name>]: it must be there.
        "pull subscriptions without a topic": sorted(
            set(ev.local("pull_subscriptions").values()) - set(ev.local("topic_ids"))
        ),
        "function topics": {e: topics[f] for e, f in functions.items()},
        "function dead-letter topics": {e: dead_letters[f] for e, f in functions.items()},
        "delivery": {k: float(v) for k, v in ev.local("delivery").items()},
        "schedules": ev.local("schedules"),
        "pipeline templates": {
            m: f"gs://{artifacts}/{name}" for m, name in ev.local("pipeline_objects").items()
        },
        "pipeline root": ev.local("pipeline_root"),
        "component image": ev.local("component_image"),
        "serving image": ev.local("serving_image"),
        "pipeline service account": ev.local("pipeline_service_account"),
        "repository": ev.local("repository"),
    }


def sweep_cron(sweep_seconds: int) -> str:
    """Cloud Scheduler's cron for a sweep every ``sweep_seconds``: whole minutes, rounded up
    (never less often than asked, except below a minute, Cloud Scheduler's finest); hourly at
    60 minutes, the most that Settings.sweep_seconds allows."""
    minutes = max(1, math.ceil(sweep_seconds / 60))
    return "0 * * * *" if minutes >= 60 else f"*/{minutes} * * * *"


def code_names(settings: Settings) -> dict[str, Any]:
    plan = topology(settings)
    scheduled = {job.model for job in jobs(settings, datetime(2030, 1, 1, tzinfo=UTC))}
    return {
        "project": settings.project,
        "region": settings.region,
        "buckets": {
            "data": settings.buckets.data,
            "artifacts": settings.buckets.artifacts,
            "registry": settings.buckets.models,
        },
        "database": settings.database,
        "sweep cron": sweep_cron(settings.sweep_seconds),
        "topics by field": settings.topics.names(),
        "all topics": sorted(plan.all_topics),
        "pull subscriptions": plan.pulls,
        "pull subscriptions without a topic": [],
        # The local push subscriptions: in the cloud, each function's Eventarc trigger.
        "function topics": {route.function: route.topic for route in plan.pushes},
        "function dead-letter topics": {r.function: r.dead_letter_topic for r in plan.pushes},
        "delivery": {k: float(v) for k, v in plan.delivery.model_dump().items()},
        "schedules": {
            m: {"cron": s.schedule.cron, "time_zone": s.schedule.timezone}
            for m, s in settings.models.items()
            if s.schedule is not None and m in scheduled and s.schedule.via == "cloud_scheduler"
        },
        "pipeline templates": {m: settings.pipeline_template(m) for m in settings.models},
        "pipeline root": settings.pipeline_root,
        "component image": settings.component_image,
        "serving image": settings.serving_image,
        "pipeline service account": settings.pipeline_service_account,
        "repository": settings.gcp.repository,
    }


def _differences(key: str, tf_value: Any, code_value: Any) -> Iterator[str]:
    if isinstance(tf_value, dict) and isinstance(code_value, dict):
        for name in sorted(code_value.keys() - tf_value.keys()):
            yield f"{key}: {name!r} is in the code but not in Terraform"
        for name in sorted(tf_value.keys() - code_value.keys()):
            yield f"{key}: Terraform has {name!r}, which the code does not"
        for name in sorted(tf_value.keys() & code_value.keys()):
            if tf_value[name] != code_value[name]:
                yield f"{key}[{name!r}]: Terraform {tf_value[name]!r}, code {code_value[name]!r}"
    elif isinstance(tf_value, list) and isinstance(code_value, list):
        for name in sorted(set(code_value) - set(tf_value)):
            yield f"{key}: {name!r} is in the code but not in Terraform"
        for name in sorted(set(tf_value) - set(code_value)):
            yield f"{key}: Terraform has {name!r}, which the code does not"
    elif tf_value != code_value:
        yield f"{key}: Terraform {tf_value!r}, code {code_value!r}"


def parity_problems(tf: Terraform, config_path: Path) -> list[str]:
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    try:
        ours = terraform_names(tf, config)
    except (Unsupported, _Missing) as exc:
        return [f"cannot evaluate the Terraform locals: {exc}"]
    theirs = code_names(load_settings(config_path))
    return [p for key in theirs for p in _differences(key, ours[key], theirs[key])]


# --- how the resources use those names -------------------------------------------------------

_TOPIC = '${google_pubsub_topic.topic["%s"].id}'

# (type, name) -> attribute path -> the exact expression. A resource of a type listed here that
# is not listed itself is an error: everything it creates must come from these locals.
WIRING: dict[tuple[str, str], dict[str, Any]] = {
    ("google_pubsub_topic", "topic"): {"for_each": "${local.topics}", "name": "${each.value}"},
    ("google_pubsub_topic", "dead_letter"): {
        "for_each": "${local.dead_letter_topics}",
        "name": "${each.value}",
    },
    ("google_pubsub_subscription", "pull"): {
        "for_each": "${local.pull_subscriptions}",
        "name": "${each.key}",
        "topic": "${local.topic_ids[each.value]}",
        "ack_deadline_seconds": "${local.delivery.ack_deadline_seconds}",
    },
    ("google_cloudfunctions2_function", "fn"): {
        "for_each": "${local.function_topics}",
        "name": "${local.function_names[each.key]}",
        "build_config.entry_point": "${each.key}",
        "build_config.runtime": "python311",
        "event_trigger.event_type": "google.cloud.pubsub.topic.v1.messagePublished",
        "event_trigger.pubsub_topic": "${google_pubsub_topic.topic[each.value].id}",
        "event_trigger.retry_policy": "RETRY_POLICY_RETRY",
        "event_trigger.service_account_email": "${google_service_account.trigger.email}",
        "service_config.ingress_settings": "ALLOW_INTERNAL_ONLY",
        "service_config.service_account_email": "${google_service_account.functions.email}",
        "service_config.environment_variables.RETRAIN_CONFIG": "retrain.yaml",
    },
    ("google_cloud_scheduler_job", "retrain"): {
        "for_each": "${local.schedules}",
        "schedule": "${each.value.cron}",
        "time_zone": "${each.value.time_zone}",
        "pubsub_target.topic_name": _TOPIC % "retrain_schedule",
        # ScheduleMessage {"model": <name>}: test_schedule_payload_is_accepted decodes it.
        "pubsub_target.data": "${base64encode(jsonencode({model = each.key}))}",
    },
    ("google_cloud_scheduler_job", "sweep"): {
        "schedule": "${local.sweep_cron}",
        "time_zone": "UTC",
        "pubsub_target.topic_name": _TOPIC % "retrain_schedule",
        # ScheduleMessage {"model": "*", "reason": "sweep"}: decoded in
        # test_schedule_payload_is_accepted.
        "pubsub_target.data": '${base64encode(jsonencode({model = "*", reason = "sweep"}))}',
    },
    ("google_cloud_scheduler_job", "monitor"): {
        "schedule": "${local.monitor_cron}",
        "time_zone": "UTC",
        "pubsub_target.topic_name": _TOPIC % "retrain_schedule",
        # ScheduleMessage {"model": "*", "reason": "monitor"}: decoded in
        # tests/unit/test_monitoring.py.
        "pubsub_target.data": '${base64encode(jsonencode({model = "*", reason = "monitor"}))}',
    },
    # One notification for the whole bucket (a bucket takes at most 10 per event type);
    # on_data_arrival routes by prefix: test_one_notification_routed_by_prefix.
    ("google_storage_notification", "data_arrival"): {
        "for_each": None,
        "count": None,
        "bucket": "${google_storage_bucket.data.name}",
        "topic": _TOPIC % "data_arrivals",
        "event_types": ["OBJECT_FINALIZE"],
        "payload_format": "JSON_API_V1",
        "object_name_prefix": None,
    },
    ("google_storage_bucket_object", "pipeline"): {
        "for_each": "${local.pipeline_objects}",
        "bucket": "${google_storage_bucket.artifacts.name}",
        "name": "${each.value}",
        "source": "${var.pipelines_dir}/${each.key}.yaml",
    },
    ("google_storage_bucket_object", "functions_source"): {
        "bucket": "${google_storage_bucket.artifacts.name}",
        "source": "${var.functions_zip}",
    },
    ("google_storage_bucket", "data"): {
        "name": "${local.data_bucket}",
        "uniform_bucket_level_access": True,
        "public_access_prevention": "enforced",
    },
    ("google_storage_bucket", "artifacts"): {
        "name": "${local.artifacts_bucket}",
        "uniform_bucket_level_access": True,
        "public_access_prevention": "enforced",
    },
    ("google_storage_bucket", "registry"): {
        "name": "${local.registry_bucket}",
        "uniform_bucket_level_access": True,
        "public_access_prevention": "enforced",
        "versioning.enabled": True,
        "force_destroy": False,
        "lifecycle.precondition.condition": (
            "${!contains([local.data_bucket, local.artifacts_bucket], local.registry_bucket)}"
        ),
    },
    ("google_storage_bucket", "access_logs"): {
        "uniform_bucket_level_access": True,
        "public_access_prevention": "enforced",
    },
    ("google_firestore_database", "state"): {
        "name": "${local.database}",
        "type": "FIRESTORE_NATIVE",
        "location_id": "${local.firestore_location}",
        # retrain/statedb.py: preconditioned batched commits, no transactions, no locks.
        "concurrency_mode": "OPTIMISTIC",
        "point_in_time_recovery_enablement": "POINT_IN_TIME_RECOVERY_ENABLED",
        "delete_protection_state": "DELETE_PROTECTION_ENABLED",
        "deletion_policy": "ABANDON",
        "depends_on": ["${google_project_service.enabled}"],
    },
    ("google_artifact_registry_repository", "components"): {
        "repository_id": "${local.repository}",
        "location": "${local.region}",
        "format": "DOCKER",
    },
    ("google_service_account", "pipelines"): {
        "account_id": '${split("@", local.pipeline_service_account)[0]}',
    },
}
_WIRED_TYPES = {rtype for rtype, _ in WIRING} - {"google_service_account"}


def wiring_problems(tf: Terraform) -> list[str]:
    problems = []
    for key, expected in WIRING.items():
        body = tf.resources.get(key)
        if body is None:
            problems.append(f"{'.'.join(key)} is missing")
            continue
        for path, want in expected.items():
            got = lookup(body, path)
            if got != want:
                problems.append(f"{'.'.join(key)}.{path} is {got!r}, not {want!r}")
    for key in sorted(tf.resources):
        if key[0] in _WIRED_TYPES and key not in WIRING:
            problems.append(f"{'.'.join(key)}: not derived from retrain.yaml (see WIRING)")
    eventarc = [k for k in tf.resources if k[0].startswith(("google_eventarc", "google_cloud_run"))]
    problems += [
        f"{'.'.join(k)}: triggers come from the functions' event_trigger"
        for k in eventarc
        if k[0] != "google_cloud_run_service_iam_member"
    ]
    return problems


# --- least privilege and stated reasons ------------------------------------------------------

_SKIP = re.compile(r"#\s*checkov:skip=(?P<check>[A-Z0-9_]+)(?::(?P<reason>.*))?")


def policy_problems(tf: Terraform) -> list[str]:
    problems = []
    for (rtype, name), body in sorted(tf.resources.items()):
        where = f"{rtype}.{name}"
        if rtype.endswith(("_iam_binding", "_iam_policy")):
            problems.append(f"{where}: authoritative IAM would remove others' grants; use _member")
        if rtype.endswith("_iam_member") and not any(c.startswith("Why:") for c in comments(body)):
            problems.append(f"{where}: a role binding needs a '# Why: <reason>' comment")
        members = json.dumps([body.get("member"), body.get("members")])
        for public in ("allUsers", "allAuthenticatedUsers"):
            if public in members:
                problems.append(f"{where}: grants a role to {public}")
    for file_name, source in tf.text.items():
        for skip in _SKIP.finditer(source):
            if len((skip["reason"] or "").strip()) < 20:
                problems.append(f"{file_name}: checkov skip of {skip['check']} has no reason")
    # The trigger identity may only invoke the functions.
    for (rtype, name), body in tf.resources.items():
        member = str(body.get("member", ""))
        if "google_service_account.trigger." in member and body.get("role") != "roles/run.invoker":
            problems.append(f"{rtype}.{name}: the trigger account gets {body.get('role')}")
        if body.get("role") == "roles/iam.serviceAccountUser" and body.get(
            "service_account_id"
        ) != ("${google_service_account.pipelines.name}"):
            problems.append(f"{rtype}.{name}: 'act as' is only for the pipeline runner account")
    return problems


# --- who can write the registry and the ledger (issue 11) ------------------------------------

# The registry bucket and the Firestore database (the run ledger and the registry's records):
# the functions' account writes both, the pipelines' account only reads them. What counts as
# reading, per service; every other role there is write access.
STORAGE_READ_ROLES = {
    "roles/storage.objectViewer",
    "roles/storage.legacyObjectReader",
    "roles/storage.legacyBucketReader",
}
DATASTORE_READ_ROLES = {"roles/datastore.viewer"}
# What the gatekeeper needs on the registry bucket: a server-side copy creates objects and,
# when a redelivered report copies onto the same names, deletes the old ones (objectCreator
# has no delete, and no read).
STORAGE_WRITE_ROLES = {"roles/storage.objectUser", "roles/storage.objectAdmin"}
DATASTORE_WRITE_ROLES = {"roles/datastore.user"}
# Project-level roles known to carry no Cloud Storage or Firestore write permission. A role on
# the project applies to every bucket and database in it, so any other one given to the
# pipelines' account is refused until someone has looked at its permissions and listed it here.
PROJECT_ROLES_WITHOUT_STORAGE_OR_DATASTORE_WRITES = {
    "roles/aiplatform.user",  # Vertex AI resources only
    "roles/viewer",  # reads everything, writes nothing
    *STORAGE_READ_ROLES,
    *DATASTORE_READ_ROLES,
}
# Resource types whose grants cannot reach the registry bucket or Firestore.
_UNRELATED_IAM = {
    "google_pubsub_topic_iam_member",
    "google_artifact_registry_repository_iam_member",
}
_DATABASE_CONDITION = 'resource.name == "${google_firestore_database.%s.id}"'


def _grantee(body: Mapping[str, Any], account: str) -> bool:
    """Whether a binding grants to ``account`` (``functions`` or ``pipelines``), however the
    member is spelled."""
    text = json.dumps([body.get("member"), body.get("members")])
    spellings = [f"google_service_account.{account}."]
    if account == "pipelines":
        spellings.append("local.pipeline_service_account")
    return any(spelling in text for spelling in spellings)


def _bucket_of(body: Mapping[str, Any]) -> str | None:
    """``google_storage_bucket.<name>``'s name for a bucket binding; None if not that form."""
    bucket = str(body.get("bucket", ""))
    if bucket == "${local.registry_bucket}":
        return "registry"
    found = re.fullmatch(r"\$\{google_storage_bucket\.(\w+)\.(?:name|id)\}", bucket)
    return found[1] if found else None


def _condition(body: Mapping[str, Any]) -> str | None:
    found = lookup(body, "condition.expression")
    return None if found is None else str(found)


@dataclass(frozen=True)
class Grant:
    where: str  # the binding, type.name
    store: str  # "registry" (the bucket) or "database" (Firestore)
    role: str
    writes: bool
    scoped: bool  # to the registry bucket or our database alone, not more


def grants(tf: Terraform, account: str) -> list[Grant]:
    """What ``account`` (``functions`` or ``pipelines``) is given on the registry bucket and
    on Firestore. A grant that the reader cannot place counts as writing both."""
    databases = [name for rtype, name in tf.resources if rtype == "google_firestore_database"]
    ours = _DATABASE_CONDITION % (databases[0] if len(databases) == 1 else "?")
    found = []
    for (rtype, name), body in sorted(tf.resources.items()):
        if not rtype.endswith(("_iam_member", "_iam_binding", "_iam_policy")):
            continue
        if not _grantee(body, account) or rtype in _UNRELATED_IAM:
            continue
        where, role = f"{rtype}.{name}", str(body.get("role", ""))
        if rtype == "google_storage_bucket_iam_member":
            bucket = _bucket_of(body)
            if bucket in (None, "registry"):  # a bucket of unknown name may be the registry
                writes = role not in STORAGE_READ_ROLES
                found.append(Grant(where, "registry", role, writes, bucket == "registry"))
        elif rtype == "google_project_iam_member" and role.startswith("roles/datastore."):
            writes = role not in DATASTORE_READ_ROLES
            found.append(Grant(where, "database", role, writes, _condition(body) == ours))
        elif rtype == "google_project_iam_member":
            # On the project: on every bucket and database in it.
            writes = role not in PROJECT_ROLES_WITHOUT_STORAGE_OR_DATASTORE_WRITES
            if writes:
                found += [Grant(where, s, role, True, False) for s in ("registry", "database")]
        else:
            # Acting as another account (serviceAccountUser, TokenCreator) would be that
            # account's access; any other kind of grant is not understood here.
            found += [Grant(where, s, role, True, False) for s in ("registry", "database")]
    return found


def access_problems(tf: Terraform) -> list[str]:
    """Where the pipelines' account could write the registry bucket or the Firestore database,
    and where the functions' account could not write them (or the pipelines' not read them)."""
    databases = [name for rtype, name in tf.resources if rtype == "google_firestore_database"]
    if len(databases) != 1:
        return [f"expected one google_firestore_database, found {databases}"]
    stores = {"registry": "the registry bucket", "database": "Firestore"}
    pipelines, functions = grants(tf, "pipelines"), grants(tf, "functions")
    problems = [
        f"{g.where}: the pipelines' account could write {stores[g.store]} ({g.role})"
        for g in pipelines
        if g.writes
    ]
    problems += [
        f"{g.where}: {g.role} is not limited to our database (condition "
        f"{_DATABASE_CONDITION % databases[0]!r})"
        for g in pipelines + functions
        if g.store == "database" and not g.scoped and g.role.startswith("roles/datastore.")
    ]
    needs = {"registry": STORAGE_WRITE_ROLES, "database": DATASTORE_WRITE_ROLES}
    for store, label in stores.items():
        if not any(g.store == store and g.scoped and not g.writes for g in pipelines):
            problems.append(f"the pipelines' account cannot read {label} (evaluate reads it)")
        if not any(g.store == store and g.scoped and g.role in needs[store] for g in functions):
            problems.append(
                f"the functions' account cannot write {label} (one of {sorted(needs[store])}"
                " on it alone)"
            )
    return problems


def published_topics(*sources: Path) -> set[str]:
    """Topic fields in ``<bus>.publish(<settings>.topics.<field>, ...)`` calls."""
    fields = set()
    for path in sources:
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
        for file in files:
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "publish"
                    and node.args
                    and isinstance(topic := node.args[0], ast.Attribute)
                    and isinstance(topic.value, ast.Attribute)
                    and topic.value.attr == "topics"
                ):
                    fields.add(topic.attr)
    return fields


def entry_points_in_code() -> set[str]:
    """Functions in triggers/main.py decorated with ``functions_framework.cloud_event``."""
    tree = ast.parse((ROOT / "triggers" / "main.py").read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).endswith("cloud_event") for d in node.decorator_list)
    }


_REFERENCE = re.compile(
    r"(?<![\w.])(?:(?P<data>data\.)?(?P<type>google_\w+)\.(?P<name>\w+)"
    r"|local\.(?P<local>\w+)|var\.(?P<var>\w+))"
)


def _without_comments(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _without_comments(v) for k, v in value.items() if not str(k).startswith("__")
        }
    if isinstance(value, list):
        return [_without_comments(v) for v in value]
    return value


def reference_problems(tf: Terraform) -> list[str]:
    """What `terraform validate` would say of references to undeclared things."""
    everything = {
        "local": tf.locals,
        "resource": tf.resources,
        "data": tf.data,
        "variable": tf.variables,
        "output": tf.outputs,
    }
    text = json.dumps(_without_comments(everything), default=str)
    problems = set()
    for ref in _REFERENCE.finditer(text):
        if ref["local"] and ref["local"] not in tf.locals:
            problems.add(f"local.{ref['local']} is not declared")
        elif ref["var"] and ref["var"] not in tf.variables:
            problems.add(f"var.{ref['var']} is not declared")
        elif ref["type"]:
            declared = tf.data if ref["data"] else tf.resources
            if (ref["type"], ref["name"]) not in declared:
                problems.add(f"{ref[0]} is not declared")
    return sorted(problems)


# --- the tests -------------------------------------------------------------------------------


def _minimal_config(tmp_path: Path) -> Path:
    """Only the required keys: every default of retrain/config.py must match Terraform's."""
    path = tmp_path / "minimal.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "project": "acme-ml-prod",
                "buckets": {"data": "acme-data", "artifacts": "acme-artifacts"},
                "models": {
                    "churn": {
                        "data_prefix": "churn/",
                        "label": "churned",
                        "order_column": "ts",
                        "schedule": {"cron": "15 2 * * 1"},
                    },
                    "fraud": {"data_prefix": "fraud/", "label": "fraud", "order_column": "ts"},
                },
            }
        ),
        encoding="utf-8",
    )
    return path


def _custom_config(tmp_path: Path) -> Path:
    """Every name that can be changed, changed."""
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    raw |= {
        "project": "acme-ml-test",
        "region": "europe-west4",
        "buckets": {"data": "acme-in", "artifacts": "acme-out", "registry": "acme-models"},
        "database": "acme-state",
        "sweep_seconds": 420,
        "topics": {"data_arrivals": "acme-arrivals", "model_decisions": "acme-decisions"},
        "delivery": {"max_delivery_attempts": 7, "max_backoff_seconds": 30},
        "gcp": {
            "repository": "acme-images",
            "image_tag": "v3",
            "pipeline_service_account": "acme-runner@acme-ml-test.iam.gserviceaccount.com",
            "endpoint": {"serving_image": "europe-docker.pkg.dev/acme-ml-test/own/serve:1"},
        },
    }
    raw["models"]["other"] = {
        "data_prefix": "other/",
        "label": "y",
        "order_column": "t",
        "schedule": {"cron": "0 * * * *", "timezone": "Europe/Amsterdam"},
    }
    raw["models"]["vertex-scheduled"] = {  # `retrain schedule sync`'s: no Cloud Scheduler job
        "data_prefix": "vertex-scheduled/",
        "label": "y",
        "order_column": "t",
        "schedule": {"cron": "0 4 * * *", "via": "pipeline_schedule"},
    }
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_config_path_is_retrain_yaml(terraform: Terraform) -> None:
    default = terraform.variables["config_path"]["default"]
    assert (TERRAFORM / default).resolve() == CONFIG
    assert terraform.locals["config"] == "${yamldecode(file(var.config_path))}"


@pytest.mark.parametrize("which", ["retrain.yaml", "minimal", "custom"])
def test_terraform_names_what_the_code_names(
    terraform: Terraform, tmp_path: Path, which: str
) -> None:
    path = {
        "retrain.yaml": lambda: CONFIG,
        "minimal": lambda: _minimal_config(tmp_path),
        "custom": lambda: _custom_config(tmp_path),
    }[which]()
    assert parity_problems(terraform, path) == []


def test_function_entry_points_agree(terraform: Terraform) -> None:
    in_code = entry_points_in_code()
    assert in_code == set(FUNCTION_TOPICS), "triggers/main.py and FUNCTION_TOPICS disagree"
    assert terraform.locals["function_topics"] == FUNCTION_TOPICS


def test_references_resolve(terraform: Terraform) -> None:
    assert reference_problems(terraform) == []


def test_resources_are_derived_from_the_config(terraform: Terraform) -> None:
    assert wiring_problems(terraform) == []


def test_roles_are_least_privilege_and_explained(terraform: Terraform) -> None:
    assert policy_problems(terraform) == []


def test_publisher_roles_match_the_publishing_code(terraform: Terraform) -> None:
    functions_side = published_topics(
        ROOT / "triggers",
        ROOT / "retrain" / "service.py",
        ROOT / "retrain" / "gatekeeper",
        ROOT / "pipelines" / "launchers.py",
    )
    assert set(terraform.locals["function_publishes"]) == functions_side
    binding = terraform.resources["google_pubsub_topic_iam_member", "functions_publish"]
    assert binding["for_each"] == "${toset(local.function_publishes)}"
    pipeline_side = {
        match
        for body in terraform.resources.values()
        if body.get("role") == "roles/pubsub.publisher"
        and "google_service_account.pipelines." in str(body.get("member"))
        for match in re.findall(r'topic\["(\w+)"\]', str(body.get("topic")))
    }
    assert pipeline_side == published_topics(ROOT / "components") == {"model_metrics"}


def test_one_notification_routed_by_prefix(terraform: Terraform, tmp_path: Path) -> None:
    """Past 10 models too: one bucket-wide notification (WIRING pins it: no for_each, no
    prefix), and on_data_arrival finds each object's model by its data_prefix."""
    notifications = [k for k in terraform.resources if k[0] == "google_storage_notification"]
    assert notifications == [("google_storage_notification", "data_arrival")]
    raw = yaml.safe_load(_minimal_config(tmp_path).read_text(encoding="utf-8"))
    spec = next(iter(raw["models"].values()))
    raw["models"] = {f"m{i:02d}": {**spec, "data_prefix": f"feeds/m{i:02d}/"} for i in range(25)}
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    settings = load_settings(path)
    for name, model in settings.models.items():
        assert settings.model_for_object(settings.buckets.data, f"{model.data_prefix}x.csv") == name
    assert settings.model_for_object(settings.buckets.data, "feeds/other/x.csv") is None
    assert settings.model_for_object(settings.buckets.artifacts, "feeds/m01/x.csv") is None


def test_schedule_payload_is_accepted() -> None:
    # The job's data is base64encode(jsonencode({model = each.key})) (WIRING pins it).
    for model in load_settings(CONFIG).models:
        assert decode(ScheduleMessage, json.dumps({"model": model}).encode()).model == model
    sweep = decode(ScheduleMessage, json.dumps({"model": "*", "reason": "sweep"}).encode())
    assert sweep.reason == "sweep"
    assert json.loads(schedule_message("*", datetime(2030, 1, 1, tzinfo=UTC))) == {
        "model": "*",
        "reason": "sweep",
    }  # what the local scheduler sends, the same


def test_dead_letter_commands_use_delivery(terraform: Terraform) -> None:
    command = json.dumps(terraform.outputs["dead_letter_commands"])
    for flag, key in (
        ("--max-delivery-attempts", "max_delivery_attempts"),
        ("--min-retry-delay", "min_backoff_seconds"),
        ("--max-retry-delay", "max_backoff_seconds"),
    ):
        assert f"{flag}=${{local.delivery.{key}}}" in command
    assert "--ack-deadline=${min(600, var.function_timeout_seconds + 60)}" in command
    assert "google_pubsub_topic.dead_letter[local.function_topics[entry_point]].id" in command
    assert terraform.locals["dead_letter_suffix"] == DEAD_LETTER_SUFFIX


# --- the checks above can fail ---------------------------------------------------------------


def _drop_function(tf: Terraform) -> None:
    del tf.locals["function_topics"]["on_drift"]


def _add_function(tf: Terraform) -> None:
    tf.locals["function_topics"]["on_replay"] = "data_arrivals"


def _drop_decision_watcher(tf: Terraform) -> None:
    tf.locals["decision_pull_suffixes"] = ["watch"]


def _rename_default_topic(tf: Terraform) -> None:
    tf.locals["topic_defaults"]["drift_alerts"] = "drift"


def _change_dead_letter_names(tf: Terraform) -> None:
    tf.locals["dead_letter_topics"] = tf.locals["dead_letter_topics"].replace(
        "${local.dead_letter_suffix}", "-dlq"
    )


def _change_default_region(tf: Terraform) -> None:
    tf.locals["region"] = '${try(local.config.region, "europe-west1")}'


def _change_default_database(tf: Terraform) -> None:
    tf.locals["database"] = '${try(local.config.database, "(default)")}'


def _registry_in_the_artifacts_bucket(tf: Terraform) -> None:
    tf.locals["registry_bucket"] = "${local.artifacts_bucket}"


def _fixed_sweep(tf: Terraform) -> None:
    tf.locals["sweep_cron"] = "*/10 * * * *"


@pytest.mark.parametrize(
    ("break_it", "symptom"),
    [
        (_drop_function, "on_drift"),
        (_add_function, "on_replay"),
        (_drop_decision_watcher, "model-decisions-serving"),
        (_rename_default_topic, "Terraform 'drift'"),
        (_change_dead_letter_names, "update its mirror"),
        (_change_default_region, "region"),
        (_change_default_database, "database: Terraform '(default)', code 'retrain'"),
        (_registry_in_the_artifacts_bucket, "buckets['registry']: Terraform 'acme-artifacts'"),
        (_fixed_sweep, "update its mirror"),
    ],
)
def test_parity_check_catches(
    terraform: Terraform, tmp_path: Path, break_it: Callable[[Terraform], None], symptom: str
) -> None:
    broken = copy.deepcopy(terraform)
    break_it(broken)
    problems = parity_problems(broken, _minimal_config(tmp_path))
    assert any(symptom in p for p in problems), problems


def test_wiring_and_policy_checks_catch(terraform: Terraform) -> None:
    broken = copy.deepcopy(terraform)
    broken.resources["google_cloud_scheduler_job", "retrain"]["for_each"] = "${local.models}"
    broken.resources["google_pubsub_topic", "extra"] = {"name": "extra"}
    problems = wiring_problems(broken)
    assert any("google_cloud_scheduler_job.retrain.for_each" in p for p in problems)
    assert any("google_pubsub_topic.extra" in p for p in problems)

    del broken.resources["google_storage_bucket_iam_member", "functions_read_data"]["__comments__"]
    broken.resources["google_project_iam_member", "functions_vertex"]["member"] = (
        "${google_service_account.trigger.member}"
    )
    broken.resources["google_storage_notification", "data_arrival"]["depends_on"] = [
        "${google_pubsub_topic_iam_member.no_such_binding}"
    ]
    problems = policy_problems(broken) + reference_problems(broken)
    assert any("no_such_binding is not declared" in p for p in problems)
    assert any("functions_read_data: a role binding needs" in p for p in problems)
    assert any("the trigger account gets roles/aiplatform.user" in p for p in problems)


# --- the registry and the ledger: who writes them (issue 11) ----------------------------------


def test_firestore_api_is_enabled(terraform: Terraform) -> None:
    # The database depends on google_project_service.enabled (WIRING pins that).
    apis = terraform.resources["google_project_service", "enabled"]["for_each"]
    assert '"firestore.googleapis.com"' in apis


def test_pipelines_cannot_write_the_registry_or_the_ledger(terraform: Terraform) -> None:
    """The pipelines' account reads the registry bucket and Firestore and writes neither; the
    functions' account writes both, each grant on that bucket or that database alone."""
    assert access_problems(terraform) == []
    pipelines = {(g.store, g.role) for g in grants(terraform, "pipelines")}
    assert pipelines == {
        ("registry", "roles/storage.objectViewer"),
        ("database", "roles/datastore.viewer"),
    }
    functions = {(g.store, g.role) for g in grants(terraform, "functions") if g.scoped}
    assert functions == {
        ("registry", "roles/storage.objectUser"),
        ("database", "roles/datastore.user"),
    }


@pytest.mark.parametrize("seconds", [5, 59, 60, 61, 420, 600, 1799, 1800, 3599, 3600])
def test_sweep_runs_at_least_every_sweep_seconds(
    terraform: Terraform, tmp_path: Path, seconds: int
) -> None:
    raw = yaml.safe_load(_minimal_config(tmp_path).read_text(encoding="utf-8"))
    raw["sweep_seconds"] = seconds
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert parity_problems(terraform, path) == []

    cron = Evaluator(terraform, raw).local("sweep_cron")
    start = datetime(2030, 1, 1, tzinfo=UTC)
    fires = croniter(cron, start)
    times = [start]
    while times[-1] < datetime(2030, 1, 3, tzinfo=UTC):
        times.append(fires.get_next(datetime))
    # times[0] is the start, not a firing.
    longest = max((b - a).total_seconds() for a, b in itertools.pairwise(times[1:]))
    # Never less often than asked, rounded up to Cloud Scheduler's whole minutes.
    asked = max(60, seconds)
    assert asked <= longest < asked + 60, (cron, longest)


_PIPELINES = "${google_service_account.pipelines.member}"
_REGISTRY = "${google_storage_bucket.registry.name}"


def _binding(tf: Terraform, rtype: str, name: str, **body: Any) -> None:
    tf.resources[rtype, name] = {**body, "__comments__": [{"value": "Why: a test"}]}


def _pipelines_write_registry(tf: Terraform) -> None:
    tf.resources["google_storage_bucket_iam_member", "pipelines_read_registry"]["role"] = (
        "roles/storage.objectUser"
    )


def _pipelines_admin_registry_by_email(tf: Terraform) -> None:
    _binding(
        tf, "google_storage_bucket_iam_member", "sneaky", bucket="${local.registry_bucket}",
        role="roles/storage.objectAdmin", member="serviceAccount:${local.pipeline_service_account}",
    )  # fmt: skip


def _pipelines_write_unknown_bucket(tf: Terraform) -> None:
    _binding(
        tf, "google_storage_bucket_iam_member", "literal", bucket="retrain-registry",
        role="roles/storage.objectCreator", member=_PIPELINES,
    )  # fmt: skip


def _pipelines_write_database(tf: Terraform) -> None:
    tf.resources["google_project_iam_member", "pipelines_read_state"]["role"] = (
        "roles/datastore.user"
    )


def _pipelines_project_storage_admin(tf: Terraform) -> None:
    _binding(
        tf, "google_project_iam_member", "wide", project="${local.project}",
        role="roles/storage.objectAdmin", member=_PIPELINES,
    )  # fmt: skip


def _pipelines_editor(tf: Terraform) -> None:
    _binding(
        tf, "google_project_iam_member", "editor", project="${local.project}",
        role="roles/editor", member=_PIPELINES,
    )  # fmt: skip


def _pipelines_firebase_admin(tf: Terraform) -> None:
    _binding(
        tf, "google_project_iam_member", "firebase", project="${local.project}",
        role="roles/firebase.admin", member=_PIPELINES,
    )  # fmt: skip


def _pipelines_act_as_functions(tf: Terraform) -> None:
    _binding(
        tf, "google_service_account_iam_member", "impersonate",
        service_account_id="${google_service_account.functions.name}",
        role="roles/iam.serviceAccountTokenCreator", member=_PIPELINES,
    )  # fmt: skip


def _pipelines_viewer_everywhere(tf: Terraform) -> None:
    del tf.resources["google_project_iam_member", "pipelines_read_state"]["condition"]


def _pipelines_cannot_read_registry(tf: Terraform) -> None:
    del tf.resources["google_storage_bucket_iam_member", "pipelines_read_registry"]


def _functions_cannot_overwrite(tf: Terraform) -> None:
    tf.resources["google_storage_bucket_iam_member", "functions_write_registry"]["role"] = (
        "roles/storage.objectCreator"
    )


def _functions_write_another_bucket(tf: Terraform) -> None:
    tf.resources["google_storage_bucket_iam_member", "functions_write_registry"]["bucket"] = (
        "${google_storage_bucket.artifacts.name}"
    )


def _functions_no_database(tf: Terraform) -> None:
    del tf.resources["google_project_iam_member", "functions_use_state"]


def _functions_every_database(tf: Terraform) -> None:
    del tf.resources["google_project_iam_member", "functions_use_state"]["condition"]


def _two_databases(tf: Terraform) -> None:
    tf.resources["google_firestore_database", "other"] = {"name": "other"}


@pytest.mark.parametrize(
    ("break_it", "symptom"),
    [
        (_pipelines_write_registry, "pipelines_read_registry: the pipelines' account could write"),
        (_pipelines_admin_registry_by_email, "sneaky: the pipelines' account could write the reg"),
        (_pipelines_write_unknown_bucket, "literal: the pipelines' account could write the reg"),
        (_pipelines_write_database, "pipelines_read_state: the pipelines' account could write"),
        (_pipelines_project_storage_admin, "wide: the pipelines' account could write the regist"),
        (_pipelines_project_storage_admin, "wide: the pipelines' account could write Firestore"),
        (_pipelines_editor, "editor: the pipelines' account could write Firestore"),
        (_pipelines_firebase_admin, "firebase: the pipelines' account could write Firestore"),
        (_pipelines_act_as_functions, "impersonate: the pipelines' account could write"),
        (_pipelines_viewer_everywhere, "datastore.viewer is not limited to our database"),
        (_pipelines_cannot_read_registry, "the pipelines' account cannot read the registry"),
        (_functions_cannot_overwrite, "the functions' account cannot write the registry bucket"),
        (_functions_write_another_bucket, "the functions' account cannot write the registry"),
        (_functions_no_database, "the functions' account cannot write Firestore"),
        (_functions_every_database, "datastore.user is not limited to our database"),
        (_two_databases, "expected one google_firestore_database"),
    ],
)
def test_access_check_catches(
    terraform: Terraform, break_it: Callable[[Terraform], None], symptom: str
) -> None:
    broken = copy.deepcopy(terraform)
    break_it(broken)
    problems = access_problems(broken)
    assert any(symptom in p for p in problems), problems
    assert access_problems(terraform) == []  # the deep copy left the real one alone


# --- project-wide roles: each one justified in the docs (issue 13) ----------------------------

DOCS = ROOT / "docs" / "deploy-gcp.md"
_DOC_ROW = re.compile(
    r"^\| `google_project_iam_member\.(\w+)` \| `(roles/[\w.]+)` \|", re.MULTILINE
)


def project_role_problems(tf: Terraform, docs: str) -> list[str]:
    """A project-wide binding (on every resource of its kind in the project) must be one that
    docs/deploy-gcp.md's "project-wide roles" table justifies, with the same role; and that
    table must not justify bindings that are gone."""
    justified = dict(_DOC_ROW.findall(docs))
    problems = []
    found = {}
    for (rtype, name), body in sorted(tf.resources.items()):
        if rtype in ("google_project_iam_binding", "google_project_iam_policy"):
            problems.append(f"{rtype}.{name}: authoritative project IAM is never justified")
        if rtype != "google_project_iam_member":
            continue
        found[name] = role = str(body.get("role"))
        if name not in justified:
            problems.append(
                f"google_project_iam_member.{name} ({role}) is project-wide and not justified "
                "in docs/deploy-gcp.md (Least privilege: the project-wide roles)"
            )
        elif justified[name] != role:
            problems.append(
                f"google_project_iam_member.{name}: {role} here, {justified[name]} there"
            )
    problems += [
        f"docs/deploy-gcp.md justifies google_project_iam_member.{name}, which iam.tf lacks"
        for name in sorted(justified.keys() - found.keys())
    ]
    return problems


def test_project_wide_roles_are_justified_here(terraform: Terraform) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    assert len(_DOC_ROW.findall(docs)) >= 1
    assert project_role_problems(terraform, docs) == []


def test_project_role_check_catches(terraform: Terraform) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    broken = copy.deepcopy(terraform)
    _binding(
        broken, "google_project_iam_member", "pubsub_acks_dead_letters", project="${local.project}",
        role="roles/pubsub.subscriber", member="${local.pubsub_service_agent}",
    )  # fmt: skip
    broken.resources["google_project_iam_member", "build_writes_logs"]["role"] = "roles/editor"
    del broken.resources["google_project_iam_member", "pipelines_vertex"]
    problems = project_role_problems(broken, docs)
    assert any(p.startswith("google_project_iam_member.pubsub_acks_dead_letters") for p in problems)
    assert any("build_writes_logs: roles/editor here" in p for p in problems)
    assert any("justifies google_project_iam_member.pipelines_vertex" in p for p in problems)
