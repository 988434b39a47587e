# The Docker repository of the component image (Settings.component_image) that every pipeline
# step runs in; infra/cloudbuild.yaml builds and pushes it. The functions' build images go
# here too (build_config.docker_repository), so the build account writes to one repository only.
resource "google_artifact_registry_repository" "components" {
  #checkov:skip=CKV_GCP_84:Images hold our open-source code and pinned public packages, no data or secrets; Google-managed encryption suffices. Set kms_key_name where an org policy requires CMEK.
  project       = local.project
  location      = local.region
  repository_id = local.repository
  format        = "DOCKER"
  description   = "retrain: the component image and the Cloud Functions' images"

  docker_config {
    immutable_tags = false # gcp.image_tag (default "latest") is pushed again on each build
  }

  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }
  cleanup_policies {
    id     = "delete-old-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "2592000s" # 30 days
    }
  }

  depends_on = [google_project_service.enabled]
}
