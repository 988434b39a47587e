# The four Cloud Functions (2nd gen), one per entry point in triggers/main.py, each triggered
# through Eventarc by the topic that retrain/config.py FUNCTION_TOPICS gives it.

# The source zip that `make deploy` builds. Its name carries its MD5, so a new zip is a new
# object and the functions are rebuilt from it.
resource "google_storage_bucket_object" "functions_source" {
  bucket       = google_storage_bucket.artifacts.name
  name         = "functions/source-${filemd5(var.functions_zip)}.zip"
  source       = var.functions_zip
  content_type = "application/zip"
}

resource "google_cloudfunctions2_function" "fn" {
  for_each = local.function_topics

  project     = local.project
  location    = local.region
  name        = local.function_names[each.key]
  description = "retrain ${each.key}: consumes ${local.topics[each.value]}"

  build_config {
    runtime           = "python311"
    entry_point       = each.key
    docker_repository = google_artifact_registry_repository.components.id
    service_account   = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.artifacts.name
        object = google_storage_bucket_object.functions_source.name
      }
    }
  }

  service_config {
    service_account_email = google_service_account.functions.email
    # Only Google-internal callers (Eventarc's Pub/Sub push); no allUsers invoker anywhere.
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    available_memory                 = var.function_memory[each.key]
    available_cpu                    = var.function_cpu
    timeout_seconds                  = var.function_timeout_seconds
    min_instance_count               = 0
    max_instance_count               = var.function_max_instances
    max_instance_request_concurrency = 1
    environment_variables = {
      RETRAIN_CONFIG = "retrain.yaml" # packed at the root of the source zip
    }
    # backend kfp with a private host (var.functions_vpc_connector): private ranges through
    # the connector, everything else (Google APIs) as before.
    vpc_connector                 = var.functions_vpc_connector
    vpc_connector_egress_settings = var.functions_vpc_connector == null ? null : "PRIVATE_RANGES_ONLY"
  }

  event_trigger {
    trigger_region        = local.region
    event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
    pubsub_topic          = google_pubsub_topic.topic[each.value].id
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.trigger.email
  }

  lifecycle {
    precondition {
      # backend local runs pipelines with kfp.local in a subprocess: not in a Cloud Function.
      condition     = contains(["vertex", "kfp"], local.backend)
      error_message = "retrain.yaml has backend: ${local.backend}; set backend: vertex (or kfp with gcp.kfp.host) to deploy."
    }
  }

  # The Eventarc service agent validates the trigger when the function is created: it must
  # exist first (main.tf); the build account's roles must be there for the build.
  depends_on = [
    google_project_service.enabled,
    google_project_service_identity.agent,
    google_project_iam_member.build_writes_logs,
    google_artifact_registry_repository_iam_member.build_pushes_images,
    google_storage_bucket_iam_member.build_reads_sources,
    google_project_iam_member.build_reads_gcf_sources,
  ]
}
