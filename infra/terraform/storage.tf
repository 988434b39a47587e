# The data bucket (new data lands under each model's data_prefix), the artifacts bucket
# (pipeline root, each run's candidate model and report, compiled pipelines, function source),
# the registry bucket (the registered models, which only the gatekeeper writes) and the bucket
# that receives the three buckets' usage logs. The run ledger and the registry's records are
# in Firestore (firestore.tf).

locals {
  # Derived from the artifacts bucket's name (63 characters at most).
  access_log_bucket = "${substr(local.artifacts_bucket, 0, 51)}-access-logs"
}

resource "google_storage_bucket" "data" {
  name     = local.data_bucket
  project  = local.project
  location = local.region # the notification topic, functions and Vertex jobs are all here

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  # Lineage names training data as bucket/object#generation: keep overwritten versions.
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  dynamic "logging" {
    for_each = var.usage_logs ? ["data/"] : []
    content {
      log_bucket        = google_storage_bucket.access_logs.name
      log_object_prefix = logging.value
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_storage_bucket" "artifacts" {
  name     = local.artifacts_bucket
  project  = local.project
  location = local.region # Vertex AI Pipelines wants its pipeline root in the job's region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  # Candidates and run reports: an overwrite or delete by mistake can be undone.
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  dynamic "logging" {
    for_each = var.usage_logs ? ["artifacts/"] : []
    content {
      log_bucket        = google_storage_bucket.access_logs.name
      log_object_prefix = logging.value
    }
  }

  depends_on = [google_project_service.enabled]
}

# The registered models: the gatekeeper copies each candidate it registers here from its run's
# prefix in the artifacts bucket (retrain/gatekeeper/registry.py keep_artifact), and what is
# served, evaluated against and uploaded to Vertex AI Model Registry is this copy. A separate
# bucket, so that the pipelines' account, which writes the artifacts bucket, can only read it
# (issue 11; iam.tf, checked by tests/unit/test_terraform.py).
resource "google_storage_bucket" "registry" {
  name     = local.registry_bucket
  project  = local.project
  location = local.region # with the artifacts bucket: the registration copy stays in the region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  # The models that served: an overwrite or delete by mistake can be undone.
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  dynamic "logging" {
    for_each = var.usage_logs ? ["registry/"] : []
    content {
      log_bucket        = google_storage_bucket.access_logs.name
      log_object_prefix = logging.value
    }
  }

  lifecycle {
    precondition {
      # Sharing a bucket would give the pipelines' write access on it to the registry.
      condition     = !contains([local.data_bucket, local.artifacts_bucket], local.registry_bucket)
      error_message = "buckets.registry (${local.registry_bucket}) must be a bucket of its own, not the data or artifacts bucket."
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_storage_bucket" "access_logs" {
  #checkov:skip=CKV_GCP_62:This is the usage-log sink of the other buckets; logging it into itself would log its own log writes.
  name     = local.access_log_bucket
  project  = local.project
  location = local.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      age = var.access_log_days
    }
    action {
      type = "Delete"
    }
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 1
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_storage_bucket_iam_member" "analytics_writes_logs" {
  # Why: Cloud Storage writes usage logs as this Google group, which needs to create objects
  # in the log bucket (with uniform bucket-level access there are no ACLs to do it). Off with
  # var.usage_logs = false, where domain-restricted sharing refuses a google.com group.
  count  = var.usage_logs ? 1 : 0
  bucket = google_storage_bucket.access_logs.name
  role   = "roles/storage.objectCreator"
  member = "group:cloud-storage-analytics@google.com"
}

# New data: one OBJECT_FINALIZE notification for the whole data bucket. on_data_arrival routes
# each object to the model whose data_prefix holds it (Settings.model_for_object; prefixes
# never overlap: retrain/config.py refuses that) and ignores the rest in one log line. One per
# bucket, not one per model: a bucket takes at most 10 notification configurations for one
# event type, so per-model notifications would stop at 10 models. The payload is the object
# resource (JSON_API_V1), as on_data_arrival expects; its attributes carry bucketId, objectId
# and objectGeneration (the dedupe key).
resource "google_storage_notification" "data_arrival" {
  bucket         = google_storage_bucket.data.name
  payload_format = "JSON_API_V1"
  topic          = google_pubsub_topic.topic["data_arrivals"].id
  event_types    = ["OBJECT_FINALIZE"]

  depends_on = [google_pubsub_topic_iam_member.gcs_publishes_data_arrivals]
}

# Compiled pipelines, where Settings.pipeline_template(model) says they are:
# gs://<buckets.artifacts>/pipelines/<model>.yaml.
resource "google_storage_bucket_object" "pipeline" {
  for_each = local.pipeline_objects

  bucket       = google_storage_bucket.artifacts.name
  name         = each.value
  source       = "${var.pipelines_dir}/${each.key}.yaml"
  content_type = "application/yaml"
}
