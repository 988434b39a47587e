output "topics" {
  description = "Topic field (retrain.config.Topics) -> topic name."
  value       = { for field, topic in google_pubsub_topic.topic : field => topic.name }
}

output "dead_letter_topics" {
  description = "Topic field -> dead-letter topic name."
  value       = { for field, topic in google_pubsub_topic.dead_letter : field => topic.name }
}

output "pull_subscriptions" {
  description = "Pull subscription name -> topic name (dead letters, and model-decisions' watchers)."
  value       = { for name, sub in google_pubsub_subscription.pull : name => sub.topic }
}

output "functions" {
  description = "Entry point -> Cloud Function name."
  value       = { for entry_point, fn in google_cloudfunctions2_function.fn : entry_point => fn.name }
}

output "eventarc_triggers" {
  description = "Entry point -> the Eventarc trigger that Cloud Functions manages for it."
  value       = { for entry_point, fn in google_cloudfunctions2_function.fn : entry_point => fn.event_trigger[0].trigger }
}

# Eventarc creates and owns each trigger's Pub/Sub subscription; its name is output-only
# (Eventarc transport.pubsub.subscription) and neither google_cloudfunctions2_function nor
# google_eventarc_trigger accepts a dead-letter or retry policy for it (provider issues
# hashicorp/terraform-provider-google#17697 and #25069). So `make deploy` runs these commands
# after `terraform apply`: they look the subscription up from the trigger, let the Pub/Sub
# service agent ack on it (roles/pubsub.subscriber on that subscription alone: forwarding a
# dead letter acks the original; iam.tf grants it the publisher role on the dead-letter
# topic), and give it the dead-letter topic and retry backoff of retrain.yaml's `delivery`,
# and an ack deadline longer than the functions' timeout (delivery.ack_deadline_seconds is
# for the local stack).
output "dead_letter_commands" {
  description = "Entry point -> shell command that puts delivery's dead-letter and retry policy on the function's Eventarc subscription."
  value = {
    for entry_point, fn in google_cloudfunctions2_function.fn : entry_point => join(" ", [
      "SUB=\"$(gcloud eventarc triggers describe '${fn.event_trigger[0].trigger}' --format='value(transport.pubsub.subscription)')\" &&",
      "gcloud pubsub subscriptions add-iam-policy-binding \"$SUB\"",
      "--member='${local.pubsub_service_agent}' --role=roles/pubsub.subscriber --format=none &&",
      "gcloud pubsub subscriptions update \"$SUB\"",
      "--dead-letter-topic='${google_pubsub_topic.dead_letter[local.function_topics[entry_point]].id}'",
      "--max-delivery-attempts=${local.delivery.max_delivery_attempts}",
      "--min-retry-delay=${local.delivery.min_backoff_seconds}s",
      "--max-retry-delay=${local.delivery.max_backoff_seconds}s",
      # Longer than a call may take (the gatekeeper waits for endpoint deploys), so that a
      # slow call is not delivered again to a second instance meanwhile.
      "--ack-deadline=${min(600, var.function_timeout_seconds + 60)}",
    ])
  }
}

output "service_accounts" {
  description = "Role -> service account email."
  value = {
    functions = google_service_account.functions.email
    trigger   = google_service_account.trigger.email
    build     = google_service_account.build.email
    pipelines = google_service_account.pipelines.email
  }
}

output "buckets" {
  description = "The data, artifacts, registry and usage-log buckets."
  value = {
    data        = google_storage_bucket.data.name
    artifacts   = google_storage_bucket.artifacts.name
    registry    = google_storage_bucket.registry.name
    access_logs = google_storage_bucket.access_logs.name
  }
}

output "database" {
  description = "The Firestore database of the run ledger and the registry's records (Settings.database), and its location."
  value = {
    name     = google_firestore_database.state.name
    id       = google_firestore_database.state.id
    location = google_firestore_database.state.location_id
  }
}

output "pipeline_root" {
  description = "Settings.pipeline_root."
  value       = local.pipeline_root
}

output "pipeline_templates" {
  description = "Model -> Settings.pipeline_template(model)."
  value       = { for model, object in google_storage_bucket_object.pipeline : model => "gs://${object.bucket}/${object.name}" }
}

output "component_image" {
  description = "Settings.component_image: what infra/cloudbuild.yaml must build and push."
  value       = local.component_image
}

output "serving_image" {
  description = "Settings.serving_image: the endpoints' serving container (ours unless retrain.yaml names another)."
  value       = local.serving_image
}

output "component_image_build_command" {
  description = "Builds components/Dockerfile and pushes it as the component image; run it from the repository root."
  value = join(" ", [
    "gcloud builds submit --project='${local.project}' --region='${local.region}'",
    "--config=infra/cloudbuild.yaml",
    "--substitutions=_IMAGE='${local.component_image}',_SERVING_IMAGE='${local.serving_image}'",
    "--service-account='${google_service_account.build.id}'",
    "--gcs-source-staging-dir='gs://${google_storage_bucket.artifacts.name}/cloudbuild/source'",
    ".",
  ])
}

output "scheduler_jobs" {
  description = "Model -> Cloud Scheduler job name."
  value       = { for model, job in google_cloud_scheduler_job.retrain : model => job.name }
}
