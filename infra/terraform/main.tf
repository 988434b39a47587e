# Every name comes from retrain.yaml, the file the code reads, so infra and code cannot disagree.
# Where retrain/config.py gives a key a default, the same default is repeated here, each with a
# pointer to the Python that owns it. tests/unit/test_terraform.py checks both directions.

locals {
  config = yamldecode(file(var.config_path))

  project          = local.config.project
  region           = try(local.config.region, "us-central1") # Settings.region
  data_bucket      = local.config.buckets.data               # Buckets.data (required)
  artifacts_bucket = local.config.buckets.artifacts          # Buckets.artifacts (required)
  models           = local.config.models                     # Settings.models (required)
  backend          = try(local.config.backend, "local")      # Settings.backend

  # Buckets.models: buckets.registry, or "<artifacts>-registry". The registered models live
  # there; only the gatekeeper (the functions' account) writes it (iam.tf).
  registry_bucket = coalesce(try(local.config.buckets.registry, null), "${local.artifacts_bucket}-registry")
  # Settings.database: the Firestore (Native mode) database of the run ledger and the
  # registry's records (retrain/statedb.py).
  database = try(local.config.database, "retrain")
  # Firestore takes a Google Cloud region as a regional location; var.firestore_location
  # names another (a multi-region such as nam5 or eur3) where wanted.
  firestore_location = coalesce(var.firestore_location, local.region)

  # Settings.sweep_seconds, rounded up to Cloud Scheduler's whole minutes. "*/N" fires at the
  # minutes of the hour divisible by N, so where N does not divide 60 the last gap of each
  # hour is shorter than N (never longer): the sweep still runs at least every N minutes.
  # 60 minutes (the most sweep_seconds allows) is once an hour.
  sweep_seconds = try(local.config.sweep_seconds, 600)
  sweep_minutes = max(1, ceil(local.sweep_seconds / 60))
  sweep_cron    = local.sweep_minutes >= 60 ? "0 * * * *" : "*/${local.sweep_minutes} * * * *"

  # Settings.monitor_seconds (default 60), rounded up to whole minutes the same way: the
  # monitor's pass (serving drift, live metrics, canaries) runs at least that often.
  monitor_seconds = try(local.config.monitor_seconds, 60)
  monitor_minutes = max(1, ceil(local.monitor_seconds / 60))
  monitor_cron    = local.monitor_minutes >= 60 ? "0 * * * *" : "*/${local.monitor_minutes} * * * *"

  # retrain/config.py Topics: the code's field name -> default topic name.
  topic_defaults = {
    data_arrivals    = "data-arrivals"
    drift_alerts     = "drift-alerts"
    retrain_schedule = "retrain-schedule"
    model_metrics    = "model-metrics"
    model_decisions  = "model-decisions"
  }
  topics = merge(local.topic_defaults, try(local.config.topics, {}))

  # retrain/topology.py DEAD_LETTER_SUFFIX: every topic has "<topic>-dead-letter".
  dead_letter_suffix = "-dead-letter"
  dead_letter_topics = { for field, topic in local.topics : field => "${topic}${local.dead_letter_suffix}" }

  # retrain/topology.py topology().pulls: subscription name -> topic name. One pull
  # subscription on every dead-letter topic (inspect and replay), and the ones on
  # model-decisions that operators and the prediction server read.
  decision_pull_suffixes = ["watch", "serving"]
  pull_subscriptions = merge(
    { for field, topic in local.dead_letter_topics : topic => topic },
    { for suffix in local.decision_pull_suffixes : "${local.topics.model_decisions}-${suffix}" => local.topics.model_decisions },
  )

  # retrain/config.py Delivery: the policy of every subscription that feeds a function.
  delivery_defaults = {
    max_delivery_attempts = 5
    ack_deadline_seconds  = 60
    min_backoff_seconds   = 1
    max_backoff_seconds   = 10
  }
  delivery = merge(local.delivery_defaults, try(local.config.delivery, {}))

  # retrain/config.py FUNCTION_TOPICS: entry point in triggers/main.py -> field of `topics`.
  # The local stack's push subscriptions are, in the cloud, the Eventarc triggers below.
  function_topics = {
    on_data_arrival = "data_arrivals"
    on_drift        = "drift_alerts"
    on_schedule     = "retrain_schedule"
    gatekeeper      = "model_metrics"
  }
  # Cloud Run service names take no '_'; a kebab-case function name is also its service name.
  function_names = { for entry_point, field in local.function_topics : entry_point => "retrain-${replace(entry_point, "_", "-")}" }
  # The topics (fields) the functions publish to: drift alerts (on_data_arrival, when an
  # arrival drifted) and decisions (gatekeeper). retrain/service.py is where they publish.
  function_publishes = ["drift_alerts", "model_decisions"]

  # retrain/config.py Gcp defaults, and the Settings properties derived from them.
  repository = try(local.config.gcp.repository, "retrain")
  image_tag  = try(local.config.gcp.image_tag, "latest")
  # Settings.pipeline_service_account: null in the file means the default.
  pipeline_service_account = coalesce(
    try(local.config.gcp.pipeline_service_account, null),
    "retrain-pipelines@${local.project}.iam.gserviceaccount.com",
  )
  # Settings.pipeline_root
  pipeline_root = "gs://${local.artifacts_bucket}/pipeline-root"
  # Settings.component_image
  component_image = "${local.region}-docker.pkg.dev/${local.project}/${local.repository}/components:${local.image_tag}"
  # Settings.serving_image
  serving_image = coalesce(try(local.config.gcp.endpoint.serving_image, null), "${local.region}-docker.pkg.dev/${local.project}/${local.repository}/serving:${local.image_tag}")
  # Settings.pipeline_template(model) is gs://<artifacts>/<this object>.
  pipeline_objects = { for model, spec in local.models : model => "pipelines/${model}.yaml" }

  # ModelSettings.schedule (optional; Schedule.timezone defaults to UTC). Schedule.via
  # pipeline_schedule is `retrain schedule sync`'s instead (it would run twice otherwise).
  schedules = {
    for model, spec in local.models : model => {
      cron      = spec.schedule.cron
      time_zone = try(spec.schedule.timezone, "UTC")
    } if try(spec.schedule, null) != null && try(spec.schedule.via, "cloud_scheduler") == "cloud_scheduler"
  }

  # Service accounts that only Terraform names (the pipeline runner's comes from the file).
  account_ids = {
    functions = "retrain-functions"
    trigger   = "retrain-trigger"
    build     = "retrain-build"
  }

  # Gcp.labels go on every resource too, with our own two.
  labels = merge(try(local.config.gcp.labels, {}), { app = "retrain", "managed-by" = "terraform" })

  # Google's service agents that this topology relies on, created explicitly (below) rather
  # than on first use: Eventarc's validates the functions' triggers, Pub/Sub's mints the push
  # tokens and forwards dead letters. Their emails are fixed by the project number.
  service_agents = {
    eventarc = "eventarc.googleapis.com"
    pubsub   = "pubsub.googleapis.com"
  }
  pubsub_service_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

# Read once the Cloud Resource Manager API is on (a new project has it off): the project
# number names the service agents.
data "google_project" "this" {
  project_id = local.project
  depends_on = [google_project_service.enabled]
}

# The APIs this topology uses, enabled before anything else: every resource below depends on
# them (scripts/deploy applies them first, alone). iam and cloudresourcemanager are off in a
# new project and the provider does not retry "API not enabled": they are listed here too.
# Left enabled on destroy: other workloads may rely on them.
resource "google_project_service" "enabled" {
  for_each = toset([
    "aiplatform.googleapis.com",
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "cloudscheduler.googleapis.com",
    "eventarc.googleapis.com",
    "firestore.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
  ])
  project            = local.project
  service            = each.value
  disable_on_destroy = false
}

# The Eventarc and Pub/Sub service agents, created now instead of lazily on first use. A new
# project's first function with an Eventarc trigger otherwise fails with "Permission denied
# while using the Eventarc Service Agent" (hashicorp/terraform-provider-google#25294), and
# the Pub/Sub agent's role bindings (iam.tf) with "does not exist". Google grants each agent
# its own service-agent role when it is created; that grant can still take a minute to
# propagate, which scripts/deploy retries (a bounded number of times). Only the beta provider
# has this resource (it calls services.generateServiceIdentity).
resource "google_project_service_identity" "agent" {
  provider = google-beta
  for_each = local.service_agents

  project = local.project
  service = each.value

  depends_on = [google_project_service.enabled]
}
