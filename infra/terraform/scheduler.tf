# One Cloud Scheduler job per model that has a `schedule`, publishing to retrain-schedule on
# the model's cron. The body is a ScheduleMessage (retrain/messages.py) that on_schedule
# accepts: {"model": "<name>"}; schema_version and scheduled_time may be left out, and the
# dedupe key is the message id of each publish. The `model` attribute matches what the local
# scheduler (retrain/scheduler.py) sets. A Pub/Sub target needs no service account: the Cloud
# Scheduler service agent publishes.
resource "google_cloud_scheduler_job" "retrain" {
  for_each = local.schedules

  project     = local.project
  region      = local.region
  name        = "retrain-${each.key}"
  description = "retrain ${each.key} on its schedule (retrain.yaml models.${each.key}.schedule)"
  schedule    = each.value.cron
  time_zone   = each.value.time_zone

  pubsub_target {
    topic_name = google_pubsub_topic.topic["retrain_schedule"].id
    data       = base64encode(jsonencode({ model = each.key }))
    attributes = {
      model = each.key
    }
  }

  retry_config {
    retry_count = 3 # retries of the publish itself
  }

  depends_on = [google_project_service.enabled]
}

# Every sweep_seconds (retrain.yaml; rounded up to whole minutes: local.sweep_cron in main.tf),
# a sweep: {"model": "*", "reason": "sweep"} makes on_schedule start a run for each model whose
# events wait with no run in flight, extend the lease of a job that still runs, and decide or
# take over a run whose job ended without a decision. A run that dies without a report holds
# its model's lease until it expires, and a quiet model has no other event to notice that. The
# name has an underscore, which model names cannot have, so it never clashes with a model's job.
resource "google_cloud_scheduler_job" "sweep" {
  project     = local.project
  region      = local.region
  name        = "retrain_sweep"
  description = "retrain: start the runs that wait for an expired lease (ScheduleMessage reason sweep)"
  schedule    = local.sweep_cron
  time_zone   = "UTC"

  pubsub_target {
    topic_name = google_pubsub_topic.topic["retrain_schedule"].id
    data       = base64encode(jsonencode({ model = "*", reason = "sweep" }))
  }

  retry_config {
    retry_count = 3
  }

  depends_on = [google_project_service.enabled]
}

# Every monitor_seconds (retrain.yaml; whole minutes: local.monitor_cron in main.tf), a pass of
# the monitor: {"model": "*", "reason": "monitor"} makes on_schedule read each model's prediction
# log and late labels (retrain/monitoring.py), check complete windows for serving drift, compute
# the live metrics, raise serving_drift and degradation alerts (each keyed by its window: a
# repeated pass starts nothing new) and settle a canary with enough labelled traffic. The
# functions' account already reads the artifacts bucket (the log) and the data bucket (labels)
# and writes Firestore (the windows): iam.tf.
resource "google_cloud_scheduler_job" "monitor" {
  project     = local.project
  region      = local.region
  name        = "retrain_monitor"
  description = "retrain: the monitor's pass over every model (ScheduleMessage reason monitor)"
  schedule    = local.monitor_cron
  time_zone   = "UTC"

  pubsub_target {
    topic_name = google_pubsub_topic.topic["retrain_schedule"].id
    data       = base64encode(jsonencode({ model = "*", reason = "monitor" }))
  }

  retry_config {
    retry_count = 3
  }

  depends_on = [google_project_service.enabled]
}
