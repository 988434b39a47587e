"""The one configuration file, ``retrain.yaml``, validated once into typed settings.

Everything else in the project receives a :class:`Settings` object; nothing below the
entry points reads the file or the environment again.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "FUNCTION_TOPICS",
    "METRICS",
    "ConfigError",
    "Gcp",
    "ModelSettings",
    "Settings",
    "load_settings",
]

Metric = Literal["roc_auc", "accuracy", "log_loss", "precision", "recall"]
METRICS: tuple[str, ...] = ("roc_auc", "accuracy", "log_loss", "precision", "recall")
ESTIMATORS = (
    "HistGradientBoostingClassifier",
    "GradientBoostingClassifier",
    "RandomForestClassifier",
    "LogisticRegression",
)

# Which Cloud Function consumes which topic (by the field name in ``topics``).
# model-decisions has no function: the prediction server and the demo pull it.
FUNCTION_TOPICS: dict[str, str] = {
    "on_data_arrival": "data_arrivals",
    "on_drift": "drift_alerts",
    "on_schedule": "retrain_schedule",
    "gatekeeper": "model_metrics",
}

MIB = 1024 * 1024

# The longest an event-driven Cloud Function (2nd gen) may run, and what a call needs besides
# the waits that the config sets: a cold start, Firestore commits, listing the data window and
# submitting the run; or, in the gatekeeper, registering the version on Vertex AI (copy,
# upload, aliases) before it waits for the endpoint deploy. A wait that leaves less than this
# is refused (docs/deploy-gcp.md, "Timing settings").
FUNCTION_TIMEOUT_SECONDS = 540
FUNCTION_WORK_SECONDS = 120


def _fits_in_a_function(value: float, work: str) -> float:
    most = FUNCTION_TIMEOUT_SECONDS - FUNCTION_WORK_SECONDS
    if value > most:
        raise ValueError(
            f"{value:g} s is waited out inside a Cloud Function, whose limit is "
            f"{FUNCTION_TIMEOUT_SECONDS} s; with up to {FUNCTION_WORK_SECONDS} s to {work}, "
            f"at most {most}"
        )
    return value


_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_TOPIC = re.compile(r"^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$")
_DATABASE = re.compile(r"^[a-z][a-z0-9-]{2,61}[a-z0-9]$")


class _Strict(BaseModel):
    """Unknown keys are errors, and values are not silently coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Buckets(_Strict):
    data: str = Field(description="Bucket where new data objects land.")
    artifacts: str = Field(description="Bucket for pipeline artifacts and run reports.")
    registry: str | None = Field(
        None,
        description="Bucket of the registered models, copied there by the gatekeeper; the "
        "pipelines can read it but not write it. Default: <artifacts>-registry.",
    )

    @field_validator("data", "artifacts", "registry")
    @classmethod
    def _bucket_name(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET.match(value):
            raise ValueError(
                f"{value!r} is not a valid bucket name (3-63 chars: lowercase letters, "
                "digits, '-', '_' and '.')"
            )
        return value

    @property
    def models(self) -> str:
        """The registry's bucket (``registry``, or ``<artifacts>-registry``)."""
        return self.registry or f"{self.artifacts}-registry"

    @model_validator(mode="after")
    def _registry_name(self) -> Self:
        if self.registry is None and not _BUCKET.match(self.models):
            raise ValueError(
                f"registry: the default {self.models!r} is not a valid bucket name; name "
                "the registry bucket"
            )
        if self.models in (self.data, self.artifacts):
            raise ValueError(
                f"registry: {self.models!r} is also the data or artifacts bucket; the "
                "registry needs a bucket of its own, which the pipelines cannot write"
            )
        return self


class Topics(_Strict):
    data_arrivals: str = "data-arrivals"
    drift_alerts: str = "drift-alerts"
    retrain_schedule: str = "retrain-schedule"
    model_metrics: str = "model-metrics"
    model_decisions: str = "model-decisions"

    @field_validator("*")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not _TOPIC.match(value) or value.startswith("goog"):
            raise ValueError(f"{value!r} is not a valid Pub/Sub topic name")
        return value

    def names(self) -> dict[str, str]:
        """Field name -> topic name, in declaration order."""
        return dict(self.model_dump())


class Delivery(_Strict):
    """Subscription policy shared by every push subscription."""

    max_delivery_attempts: int = Field(5, ge=5, le=100)
    ack_deadline_seconds: int = Field(60, ge=10, le=600)
    min_backoff_seconds: float = Field(1.0, ge=0, le=600)
    max_backoff_seconds: float = Field(10.0, ge=0, le=600)

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.min_backoff_seconds > self.max_backoff_seconds:
            raise ValueError(
                f"min_backoff_seconds ({self.min_backoff_seconds}) must not exceed "
                f"max_backoff_seconds ({self.max_backoff_seconds})"
            )
        return self


Port = Annotated[int, Field(ge=1024, le=65535)]


class Ports(_Strict):
    pubsub: Port = 8085
    firestore: Port = 8086
    gcs: Port = 4443
    on_data_arrival: Port = 8091
    on_drift: Port = 8092
    on_schedule: Port = 8093
    gatekeeper: Port = 8094
    scheduler: Port = 8095
    serving: Port = 8080

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        seen: dict[int, str] = {}
        for name, port in self.model_dump().items():
            if port in seen:
                raise ValueError(f"port {port} is given to both {seen[port]} and {name}")
            seen[port] = name
        return self


class LocalStack(_Strict):
    host: str = "127.0.0.1"
    state_dir: Path = Field(Path(".retrain"), description="Relative to the config file.")
    ports: Ports = Ports()
    task_zygote_idle_seconds: float = Field(
        600.0,
        ge=0,
        description="Local pipeline tasks fork from a warm interpreter that has imported "
        "the steps' libraries (pipelines.zygote); it exits after this long without a task. "
        "0: each task starts a new Python process, as kfp.local does.",
    )
    serving_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes of the prediction server (`python -m serving "
        "--workers`); each loads every champion and swaps it on its own.",
    )

    @field_validator("host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"{value!r} is not a loopback address; the local stack binds only there"
            )
        return value

    @field_validator("state_dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return Path(value) if isinstance(value, str) else value


class Kfp(_Strict):
    """A Kubeflow Pipelines API server (``backend: kfp``), e.g. KFP on GKE."""

    host: str | None = Field(
        None, description="The KFP API server, e.g. https://kfp.example.com/pipeline."
    )
    experiment: str = Field("retrain", min_length=1, description="Runs are filed under it.")
    namespace: str | None = Field(None, description="Multi-user KFP: the profile namespace.")

    @field_validator("host")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class Endpoint(_Strict):
    """How a promoted version is deployed to the model's Vertex AI endpoint."""

    machine_type: str = "n1-standard-2"
    min_replica_count: int = Field(1, ge=1, le=100)
    max_replica_count: int = Field(1, ge=1, le=100)
    canary_percent: int = Field(
        0,
        ge=0,
        le=99,
        description="0: the new version takes all traffic and the old one is undeployed once "
        "the new one serves; 1-99: the new version gets this share, the old keeps the rest "
        "(a static split, until the next promotion). A model with gate.canary ignores it: "
        "its canary gets gate.canary.percent, and a completed canary or a plain promotion "
        "takes all traffic.",
    )
    request_response_logging_table: str | None = Field(
        None,
        pattern=r"^bq://[A-Za-z0-9_.:-]+$",
        description="The BigQuery table (bq://project.dataset.table) where each model's "
        "endpoint logs a sample (models.<m>.serving.log_sample_rate) of its requests and "
        "responses; set when the endpoint is created. Default: the table Vertex AI makes, "
        "bq://<project>.logging_<endpoint display name>_<endpoint id>.request_response_logging.",
    )
    deploy_wait_seconds: float = Field(
        360.0,
        ge=0,
        description="How long the gatekeeper waits for a deploy before it lets the deploy go "
        "on in Vertex AI (the next call finishes it); at most 420, so that the registration "
        "before it fits the functions' 540 s too.",
    )
    serving_image: str | None = Field(
        None,
        description="The endpoint's serving container. Default: ours (serving/Dockerfile, "
        "built next to the component image), whose scikit-learn is the one the models were "
        "trained with; Vertex AI's prebuilt scikit-learn images cannot load them.",
    )

    @field_validator("deploy_wait_seconds")
    @classmethod
    def _deploy_wait(cls, value: float) -> float:
        return _fits_in_a_function(value, "register the version before the wait")

    @model_validator(mode="after")
    def _replicas(self) -> Self:
        if self.min_replica_count > self.max_replica_count:
            raise ValueError(
                f"min_replica_count ({self.min_replica_count}) exceeds max_replica_count "
                f"({self.max_replica_count})"
            )
        return self


_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_SERVICE_ACCOUNT = re.compile(
    r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z0-9.-]+\.iam\.gserviceaccount\.com$"
)


class Gcp(_Strict):
    """Google Cloud names that the ``vertex`` and ``kfp`` backends and Terraform share.

    Every name has a default derived from ``project``, ``region`` and ``buckets``, so the
    local stack needs none of it; Terraform reads the same keys (with the same defaults).
    """

    repository: str = Field(
        "retrain",
        description="Artifact Registry (Docker) repository of the component and serving images.",
    )
    image_tag: str = Field("latest", description="Tag of the component image.")
    pipeline_service_account: str | None = Field(
        None, description="Runs the pipelines. Default: retrain-pipelines@<project>.iam..."
    )
    network: str | None = Field(
        None, description="VPC network peered with Vertex AI: projects/NUMBER/global/networks/NAME."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Put on every pipeline job and model version."
    )
    enable_caching: bool = Field(
        False, description="Vertex/KFP step caching; off, so new data is always read."
    )
    kfp: Kfp = Kfp()
    endpoint: Endpoint = Endpoint()

    @field_validator("pipeline_service_account")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        if value is not None and not _SERVICE_ACCOUNT.match(value):
            raise ValueError(
                f"{value!r} is not a service account email (NAME@PROJECT.iam.gserviceaccount.com)"
            )
        return value

    @field_validator("network")
    @classmethod
    def _network(cls, value: str | None) -> str | None:
        if value is not None and not re.match(
            r"^projects/[0-9]+/global/networks/[a-z][a-z0-9-]*$", value
        ):
            raise ValueError(f"{value!r} is not projects/NUMBER/global/networks/NAME")
        return value

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r}: use lowercase letters, digits and '-', starting with a letter"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            if not _LABEL.match(key) or not _LABEL_VALUE.match(label):
                raise ValueError(
                    f"label {key}={label!r}: keys start with a lowercase letter; keys and values "
                    "use lowercase letters, digits, '_' and '-', at most 63 characters"
                )
        return value


class TrainingWindow(_Strict):
    rows: PositiveInt | None = Field(
        None, description="Train on the latest N rows by the order column; null means all rows."
    )
    max_bytes: PositiveInt = Field(
        256 * MIB,
        description="A run reads the newest accepted objects until they hold `rows` rows, "
        "and never more than this many bytes of objects (the newest object always counts).",
    )


class Validation(_Strict):
    """The rules every arriving object must pass, whatever the arrival policy; an object
    that breaks one is quarantined: left out of every data window, until released."""

    min_object_rows: PositiveInt = Field(20, description="Fewer rows than this: quarantined.")
    max_object_bytes: PositiveInt = Field(
        64 * MIB, description="A bigger object is quarantined unread (the check's memory bound)."
    )
    unlabelled_rows: Literal["reject", "drop"] = Field(
        "reject",
        description="Rows whose label is null: reject quarantines the object (and a run leaves "
        "it out); drop keeps the object and trains and evaluates without those rows.",
    )


class Estimator(_Strict):
    name: str = "HistGradientBoostingClassifier"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ESTIMATORS:
            raise ValueError(f"unknown estimator {value!r}; choose one of {', '.join(ESTIMATORS)}")
        return value


class Evaluation(_Strict):
    fraction: float = Field(0.2, gt=0, lt=1, description="Newest share of the window held out.")
    min_rows: PositiveInt = 100


class Bound(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some(self) -> Self:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Improvement(_Strict):
    absolute: float | None = Field(None, ge=0)
    relative: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> Self:
        if self.absolute is not None and self.relative is not None:
            raise ValueError("give absolute or relative, not both")
        return self


class Gate(_Strict):
    primary_metric: Metric = "roc_auc"
    min_eval_rows: PositiveInt = 100
    thresholds: dict[Metric, Bound] = Field(default_factory=dict)
    min_improvement: Improvement = Improvement(absolute=0.0)
    max_regression: dict[Metric, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    on_schema_change: Literal["hold", "thresholds_only"] = Field(
        "hold",
        description="When the window lacks features the champion needs, the champion cannot "
        "be scored on the candidate's rows: hold keeps the champion (the decision names the "
        "missing features; `retrain promote` is the way out); thresholds_only promotes a "
        "candidate that meets the value thresholds.",
    )
    canary: Canary | None = Field(
        None,
        description="If set, a candidate that passes the gate serves a share of the traffic "
        "first and is promoted, or rolled back, on its live metric (docs/monitoring.md).",
    )


class Canary(_Strict):
    """A promoted candidate serves ``percent`` of the traffic first; once ``min_labelled`` of
    its logged predictions have late labels, the gatekeeper compares its live metric with the
    previous champion's on the same window and completes the promotion or rolls it back."""

    percent: int = Field(ge=1, le=99, description="The candidate's share of the traffic.")
    min_labelled: PositiveInt = Field(
        300, description="Labelled canary predictions needed before the canary is judged."
    )
    max_regression: float = Field(
        0.02,
        ge=0,
        description="How far the canary's live metric may fall below the previous "
        "champion's, on the same window, and still complete.",
    )
    metric: Metric | None = Field(
        None, description="The live metric compared; default: gate.primary_metric."
    )


class Schedule(_Strict):
    cron: str
    timezone: str = "UTC"
    via: Literal["cloud_scheduler", "pipeline_schedule"] = Field(
        "cloud_scheduler",
        description="cloud_scheduler: a Cloud Scheduler job publishes to retrain-schedule "
        "(Terraform makes it; the tick goes through the ledger). pipeline_schedule: a Vertex "
        "AI PipelineJobSchedule or KFP recurring run (`retrain schedule sync`) runs the "
        "pipeline itself. Locally, the scheduler process stands in for both.",
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not croniter.is_valid(value) or len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a valid 5-field cron expression")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"{value!r} is not a known IANA time zone (e.g. UTC, Europe/Paris)"
            ) from exc
        return value


class Drift(_Strict):
    psi_threshold: float = Field(0.2, gt=0)
    ks_pvalue: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="A feature drifts below this p-value: of the KS test for a numeric "
        "feature, of the chi-squared test for a categorical one.",
    )
    min_drifted_features: PositiveInt = 1
    degradation_margin: float = Field(0.05, ge=0, le=1)


class ServingPolicy(_Strict):
    log_sample_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="The share of prediction requests logged (instances, predictions, the "
        "version that answered, request id, time) to gs://<buckets.artifacts>/predictions/, "
        "for the monitor and the canary; 0 turns logging off.",
    )
    log_max_rows_per_second: float | None = Field(
        10_000.0,
        gt=0,
        description="Our prediction server logs at most about this many instances a second "
        "per process: when the last second brought more, each request is logged with the "
        "probability that keeps to it (times log_sample_rate), still one uniform draw per "
        "request. It bounds what logging costs under heavy load (a 1,000-row request is "
        "~70 KB of log). null: no bound. Vertex AI endpoints log at log_sample_rate only.",
    )


class Monitoring(_Strict):
    window_seconds: float = Field(
        3600.0,
        gt=0,
        description="Served inputs are drift-checked per window of this length (aligned to "
        "the epoch); the live metric is computed over the last window.",
    )
    min_rows: PositiveInt = Field(
        100, description="A window with fewer logged rows is not drift-checked."
    )
    labels_prefix: str | None = Field(
        None,
        description="Late labels (request_id, label[, index]) arrive as CSV or JSON-lines "
        "objects under gs://<buckets.data>/<labels_prefix>; default labels/<model>/.",
    )

    @field_validator("labels_prefix")
    @classmethod
    def _labels(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or value.startswith("/") or not value.endswith("/") or ".." in value
        ):
            raise ValueError(
                f"{value!r} must be a relative object prefix ending in '/', without '..'"
            )
        return value


class CustomComponents(_Strict):
    """Bring your own step: a ``component.yaml`` (path, relative to this file, or URL)."""

    preprocess: str | None = None
    train: str | None = None

    def items(self) -> dict[str, str]:
        return {step: ref for step, ref in self.model_dump().items() if ref}


class ModelSettings(_Strict):
    data_prefix: str = Field(
        description="Objects under gs://<buckets.data>/<data_prefix> feed this model."
    )
    format: Literal["csv", "parquet"] = "csv"
    label: str
    features: list[str] | None = Field(
        None,
        description="Default: every column but the label, the order column and exclude_columns.",
    )
    categorical: list[str] = Field(
        default_factory=list,
        description="Features whose values are categories (strings, codes or pandas "
        "categories), not quantities: encoded by category, drift-checked by PSI and "
        "chi-squared over categories.",
    )
    exclude_columns: list[str] = Field(
        default_factory=list,
        description="Columns in the data that are neither features nor label nor order "
        "column (ids, timestamps, other models' outputs): ignored.",
    )
    threads: PositiveInt | None = Field(
        None,
        description="OpenMP and BLAS threads of each step of this model's runs; default: the "
        "CPUs available to the step's process.",
    )
    order_column: str
    training_window: TrainingWindow = TrainingWindow()
    estimator: Estimator = Estimator()
    evaluation: Evaluation = Evaluation()
    gate: Gate = Gate()
    schedule: Schedule | None = None
    arrival_policy: Literal["every_arrival", "on_drift", "on_drift_or_degradation"] = (
        "every_arrival"
    )
    drift: Drift = Drift()
    serving: ServingPolicy = ServingPolicy()
    monitoring: Monitoring = Monitoring()
    validation: Validation = Validation()
    components: CustomComponents = CustomComponents()
    coalesce_seconds: float = Field(
        30.0, ge=0, description="Waited out in the trigger function before it submits the run."
    )
    lease_seconds: float = Field(3600.0, gt=0)

    @field_validator("data_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or not value.endswith("/") or ".." in value:
            raise ValueError(
                f"{value!r} must be a relative object prefix ending in '/', without '..'"
            )
        return value

    @field_validator("coalesce_seconds")
    @classmethod
    def _coalesce(cls, value: float) -> float:
        return _fits_in_a_function(value, "gather the events and submit the run")

    @field_validator("label", "order_column")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _columns(self) -> Self:
        if self.label == self.order_column:
            raise ValueError(f"label and order_column are both {self.label!r}")
        if self.features is not None:
            if not self.features:
                raise ValueError("features: give at least one feature, or leave it out")
            for reserved in (self.label, self.order_column):
                if reserved in self.features:
                    raise ValueError(f"features: {reserved!r} is the label or order column")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features: listed more than once")
        return self

    @model_validator(mode="after")
    def _column_lists(self) -> Self:
        for field, names in (
            ("categorical", self.categorical),
            ("exclude_columns", self.exclude_columns),
        ):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{field}: {_names(twice)} listed more than once")
            reserved = [n for n in names if n in (self.label, self.order_column)]
            if reserved:
                raise ValueError(f"{field}: {_names(reserved)} is the label or order column")
        both = [n for n in self.categorical if n in self.exclude_columns]
        if both:
            raise ValueError(f"categorical and exclude_columns both list {_names(both)}")
        if self.features is not None:
            excluded = [n for n in self.exclude_columns if n in self.features]
            if excluded:
                raise ValueError(f"exclude_columns: {_names(excluded)} is listed under features")
            unknown = [n for n in self.categorical if n not in self.features]
            if unknown:
                raise ValueError(f"categorical: {_names(unknown)} is not listed under features")
        return self


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


class Settings(_Strict):
    project: str
    region: str = "us-central1"
    backend: Literal["local", "vertex", "kfp"] = "local"
    buckets: Buckets
    database: str = Field(
        "retrain",
        description="Firestore database (Native mode) of the run ledger and the model "
        "registry; locally the Firestore emulator.",
    )
    sweep_seconds: int = Field(
        600,
        ge=5,
        le=3600,
        description="How often the sweep looks for runs that died and events left waiting "
        "(Cloud Scheduler: rounded up to whole minutes).",
    )
    monitor_seconds: int = Field(
        60,
        ge=5,
        le=3600,
        description="How often the monitor reads the prediction logs and late labels "
        "(serving drift, live metrics, canaries).",
    )
    topics: Topics = Topics()
    delivery: Delivery = Delivery()
    local: LocalStack = LocalStack()
    gcp: Gcp = Gcp()
    models: dict[str, ModelSettings] = Field(min_length=1)

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        if not _PROJECT.match(value):
            raise ValueError(
                f"{value!r} is not a valid project id (6-30 chars: lowercase letters, digits, '-')"
            )
        return value

    @field_validator("database")
    @classmethod
    def _database(cls, value: str) -> str:
        if value != "(default)" and not _DATABASE.match(value):
            raise ValueError(
                f"{value!r} is not a valid Firestore database id (4-63 chars: lowercase "
                "letters, digits and '-', starting with a letter), nor '(default)'"
            )
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"model name {name!r} must start with a lowercase letter and use only "
                    "lowercase letters, digits and '-'"
                )
        prefixes = sorted((m.data_prefix, n) for n, m in value.items())
        for (p1, n1), (p2, n2) in pairwise(prefixes):
            if p2.startswith(p1):
                raise ValueError(f"data_prefix of {n2!r} ({p2!r}) overlaps that of {n1!r} ({p1!r})")
        return value

    @model_validator(mode="after")
    def _labels_apart(self) -> Self:
        for name in self.models:
            labels = self.labels_prefix(name)
            for other, spec in self.models.items():
                data = spec.data_prefix
                if labels.startswith(data) or data.startswith(labels):
                    raise ValueError(
                        f"models.{name}.monitoring.labels_prefix {labels!r} overlaps the "
                        f"data_prefix of {other!r} ({data!r}): labels are not training data"
                    )
        return self

    @model_validator(mode="after")
    def _backend_needs(self) -> Self:
        if self.backend == "kfp" and self.gcp.kfp.host is None:
            raise ValueError("backend kfp needs gcp.kfp.host, the KFP API server's URL")
        return self

    @property
    def pipeline_service_account(self) -> str:
        """The service account that runs the pipelines (Terraform creates it)."""
        return self.gcp.pipeline_service_account or (
            f"retrain-pipelines@{self.project}.iam.gserviceaccount.com"
        )

    @property
    def pipeline_root(self) -> str:
        return f"gs://{self.buckets.artifacts}/pipeline-root"

    @property
    def component_image(self) -> str:
        """The component image in the project's Artifact Registry (Cloud Build pushes it)."""
        return (
            f"{self.region}-docker.pkg.dev/{self.project}/{self.gcp.repository}/"
            f"components:{self.gcp.image_tag}"
        )

    @property
    def serving_image(self) -> str:
        """The container that serves a model version on a Vertex AI endpoint."""
        return self.gcp.endpoint.serving_image or (
            f"{self.region}-docker.pkg.dev/{self.project}/{self.gcp.repository}/"
            f"serving:{self.gcp.image_tag}"
        )

    def run_prefix(self, model: str, run_id: str) -> str:
        """Where a run keeps what outlives it: the candidate model, eval rows, its report."""
        return f"gs://{self.buckets.artifacts}/runs/{model}/{run_id}"

    def pipeline_template(self, model: str) -> str:
        """Where ``make deploy`` uploads the model's compiled pipeline."""
        return f"gs://{self.buckets.artifacts}/pipelines/{model}.yaml"

    def labels_prefix(self, model: str) -> str:
        """Where late labels for ``model`` arrive: gs://<buckets.data>/<this>."""
        return self.models[model].monitoring.labels_prefix or f"labels/{model}/"

    def predictions_prefix(self, model: str) -> str:
        """Where the prediction server logs ``model``'s predictions (retrain/predictions.py)."""
        return f"gs://{self.buckets.artifacts}/predictions/{model}/"

    def model_for_object(self, bucket: str, name: str) -> str | None:
        """The model whose data prefix holds ``gs://bucket/name``, if any."""
        if bucket != self.buckets.data:
            return None
        for model, spec in self.models.items():
            if name.startswith(spec.data_prefix):
                return model
        return None


class ConfigError(Exception):
    """A configuration file that cannot be used; ``problems`` lists (key, reason) pairs."""

    def __init__(self, path: Path, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  {key}: {reason}" for key, reason in problems)
        super().__init__(f"{path}: {len(problems)} problem(s)\n{lines}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _problems(error: ValidationError) -> Iterator[tuple[str, str]]:
    for item in error.errors(include_url=False):
        loc = list(item["loc"])
        kind = item["type"]
        if loc and loc[-1] == "[key]":
            # A bad key of a mapping (e.g. a metric name): name the key, not pydantic's marker.
            loc.pop()
            expected = item.get("ctx", {}).get("expected")
            reason = f"unknown key; expected {expected}" if expected else item["msg"]
            yield ".".join(str(part) for part in loc), reason
            continue
        key = ".".join(str(part) for part in loc) or "(top level)"
        if kind == "extra_forbidden":
            reason = "unknown key"
        elif kind == "missing":
            reason = "required key is missing"
        else:
            reason = item["msg"].removeprefix("Value error, ")
            if "input" in item and kind.endswith("_type"):
                reason += f" (got {type(item['input']).__name__} {item['input']!r})"
        yield key, reason


def load_settings(path: Path) -> Settings:
    """Read and validate ``path``; raise :class:`ConfigError` naming every bad key."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, [("(file)", f"not UTF-8 text: {exc.reason} at byte {exc.start}")]
        ) from exc
    except OSError as exc:
        raise ConfigError(path, [("(file)", f"cannot read: {exc.strerror or exc}")]) from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise ConfigError(
            path, [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]
        ) from exc
    if not isinstance(raw, dict):
        raise ConfigError(path, [("(top level)", "expected a mapping of keys to values")])
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, list(_problems(exc))) from exc
    return _resolve_paths(settings, path.parent)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    """Relative paths in the file are relative to the file, not to the working directory."""
    state_dir = settings.local.state_dir
    if not state_dir.is_absolute():
        local = settings.local.model_copy(update={"state_dir": (base / state_dir).resolve()})
        settings = settings.model_copy(update={"local": local})
    models = {}
    for name, model in settings.models.items():
        refs = {
            step: ref if "://" in ref or Path(ref).is_absolute() else str((base / ref).resolve())
            for step, ref in model.components.items().items()
        }
        components = model.components.model_copy(update=refs)
        models[name] = model.model_copy(update={"components": components})
    return settings.model_copy(update={"models": models})
