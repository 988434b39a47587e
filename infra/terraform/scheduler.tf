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
