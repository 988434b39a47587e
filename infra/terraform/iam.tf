# Service accounts with least privilege. Every binding says why it exists ("Why:"), and is on
# the narrowest resource that works: a topic, a bucket, a repository, a service account or a
# Cloud Run service. Project-level bindings are only those whose resources Terraform cannot
# name (Vertex AI jobs and models, build logs, Eventarc's own subscriptions), and Firestore's:
# its roles are granted on the project only, so each of those is conditioned on our database.
#
# Issue 11: the pipelines' account cannot write the registry bucket or the Firestore database
# (the ledger and the registry's records); only the functions' account writes both.
# tests/unit/test_terraform.py test_pipelines_cannot_write_the_registry_or_the_ledger checks it.

# --- service accounts ---------------------------------------------------------------------

resource "google_service_account" "functions" {
  project      = local.project
  account_id   = local.account_ids.functions
  display_name = "retrain Cloud Functions (runtime)"
  description  = "Runs on_data_arrival, on_drift, on_schedule and gatekeeper."

  depends_on = [google_project_service.enabled] # iam.googleapis.com is off in a new project
}

resource "google_service_account" "trigger" {
  project      = local.project
  account_id   = local.account_ids.trigger
  display_name = "retrain Eventarc triggers"
  description  = "Identity of the functions' Eventarc triggers: it may only invoke the functions."

  depends_on = [google_project_service.enabled] # iam.googleapis.com is off in a new project
}

resource "google_service_account" "build" {
  project      = local.project
  account_id   = local.account_ids.build
  display_name = "retrain builds"
  description  = "Builds the functions' images and the component image (infra/cloudbuild.yaml)."

  depends_on = [google_project_service.enabled] # iam.googleapis.com is off in a new project
}

# The pipeline runner: gcp.pipeline_service_account, or retrain-pipelines@<project> by default
# (Settings.pipeline_service_account), which the Vertex launcher passes to every PipelineJob.
resource "google_service_account" "pipelines" {
  project      = local.project
  account_id   = split("@", local.pipeline_service_account)[0]
  display_name = "retrain pipelines (runner)"
  description  = "Runs the Vertex AI pipeline jobs: validate+preprocess, train, evaluate."

  lifecycle {
    precondition {
      condition     = endswith(local.pipeline_service_account, "@${local.project}.iam.gserviceaccount.com")
      error_message = "gcp.pipeline_service_account must be an account of project ${local.project}: Terraform creates it and grants its roles."
    }
  }

  depends_on = [google_project_service.enabled] # iam.googleapis.com is off in a new project
}

# --- the functions' runtime account -------------------------------------------------------

resource "google_pubsub_topic_iam_member" "functions_publish" {
  # Why: on_data_arrival and on_schedule's monitor pass publish DriftAlerts, and gatekeeper
  # publishes Decisions (retrain/service.py); they publish to no other topic.
  for_each = toset(local.function_publishes)
  project  = local.project
  topic    = google_pubsub_topic.topic[each.key].name
  role     = "roles/pubsub.publisher"
  member   = google_service_account.functions.member
}

resource "google_storage_bucket_iam_member" "functions_read_data" {
  # Why: on_data_arrival reads each arrived object to check it against the rules (and for drift);
  # the sweep lists the data prefixes for objects whose notification was lost. It never writes data.
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.functions.member
}

resource "google_storage_bucket_iam_member" "functions_read_artifacts" {
  # Why: the functions read the artifacts bucket only: the compiled pipeline templates they
  # submit, each run's kept report (the gatekeeper and the sweep decide from it) and the
  # candidate the gatekeeper copies into the registry bucket (get and list on the source).
  # The ledger and the registry's records are in Firestore now, the models in the registry
  # bucket: nothing the functions write is here.
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.functions.member
}

resource "google_storage_bucket_iam_member" "functions_get_artifacts_bucket" {
  # Why: PipelineJob.submit() first checks that the pipeline root's bucket exists
  # (storage.buckets.get), which roles/storage.objectUser does not grant.
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.legacyBucketReader"
  member = google_service_account.functions.member
}

resource "google_storage_bucket_iam_member" "functions_write_registry" {
  # Why: the gatekeeper registers a candidate by copying it into the registry bucket
  # (server-side copy: storage.objects.create, plus storage.objects.delete because a
  # redelivered report copies onto the same names again), and on_data_arrival downloads the
  # champion from it for the degradation check (get, list). objectUser is exactly that, without
  # objectAdmin's object IAM permissions; objectCreator cannot overwrite, nor read.
  bucket = google_storage_bucket.registry.name
  role   = "roles/storage.objectUser"
  member = google_service_account.functions.member
}

resource "google_project_iam_member" "functions_use_state" {
  # Why: the triggers and the gatekeeper keep the run ledger and the registry's records in
  # Firestore: reads, queries and batched commits that create, update and delete documents
  # (retrain/statedb.py). Firestore roles exist only at project level; the condition limits
  # this one to our database (Firestore's per-database access, on the database's resource name).
  project = local.project
  role    = "roles/datastore.user"
  member  = google_service_account.functions.member

  condition {
    title      = "retrain-database-only"
    expression = "resource.name == \"${google_firestore_database.state.id}\""
  }
}

resource "google_project_iam_member" "functions_vertex" {
  # Why: the functions submit Vertex AI pipeline jobs, register model versions (aliases,
  # default version) and deploy them to endpoints; those resources are created at run time,
  # so only a project-level grant can cover them. backend vertex only: with kfp the functions
  # call the KFP API server and never Vertex AI.
  count   = local.backend == "vertex" ? 1 : 0
  project = local.project
  role    = "roles/aiplatform.user"
  member  = google_service_account.functions.member
}

resource "google_service_account_iam_member" "functions_act_as_pipelines" {
  # Why: a pipeline job runs as the pipeline runner account; submitting one needs "act as"
  # on that account, and on no other.
  service_account_id = google_service_account.pipelines.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.functions.member
}

# --- the pipeline runner ------------------------------------------------------------------

resource "google_storage_bucket_iam_member" "pipelines_read_data" {
  # Why: validate+preprocess reads the model's training window from the data bucket.
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.pipelines.member
}

resource "google_storage_bucket_iam_member" "pipelines_use_artifacts" {
  # Why: the steps write the pipeline root (step outputs) and their run's own prefix,
  # runs/<model>/<run id>/ (the trained candidate, the evaluation rows, the kept report).
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectUser"
  member = google_service_account.pipelines.member
}

resource "google_storage_bucket_iam_member" "pipelines_read_registry" {
  # Why: evaluate downloads the champion from the registry bucket to score it on the same
  # rows as the candidate. Read only: what serves is written by the gatekeeper alone.
  bucket = google_storage_bucket.registry.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.pipelines.member
}

resource "google_project_iam_member" "pipelines_read_state" {
  # Why: evaluate reads the champion pointer and its version's record from the registry in
  # Firestore. Read only (no entity create, update or delete): a pipeline cannot touch the
  # ledger or the registry. Conditioned on our database, as the functions' grant is.
  project = local.project
  role    = "roles/datastore.viewer"
  member  = google_service_account.pipelines.member

  condition {
    title      = "retrain-database-only"
    expression = "resource.name == \"${google_firestore_database.state.id}\""
  }
}

resource "google_pubsub_topic_iam_member" "pipelines_publish_metrics" {
  # Why: evaluate (and the exit handler of a failed run) publishes the MetricsReport that
  # wakes the gatekeeper.
  project = local.project
  topic   = google_pubsub_topic.topic["model_metrics"].name
  role    = "roles/pubsub.publisher"
  member  = google_service_account.pipelines.member
}

resource "google_artifact_registry_repository_iam_member" "pipelines_pull_images" {
  # Why: every pipeline step runs in the component image from this repository.
  project    = local.project
  location   = google_artifact_registry_repository.components.location
  repository = google_artifact_registry_repository.components.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.pipelines.member
}

resource "google_project_iam_member" "pipelines_vertex" {
  # Why: Vertex AI Pipelines runs the job as this account: creating the job's metadata
  # store entries, contexts, executions and artifacts (Vertex ML Metadata) and the steps'
  # CustomJobs is done with its permissions, and those resources are created at run time, so
  # only a project-level grant covers them (Vertex AI Pipelines' documented role for a runner
  # account). The steps' own code never calls Vertex AI. backend vertex only.
  count   = local.backend == "vertex" ? 1 : 0
  project = local.project
  role    = "roles/aiplatform.user"
  member  = google_service_account.pipelines.member
}

# --- the Eventarc trigger identity ----------------------------------------------------------

resource "google_cloud_run_service_iam_member" "trigger_invokes" {
  # Why: Eventarc pushes each event to the function's Cloud Run service as this account;
  # run.invoker on exactly these four services is all it can do. (Pub/Sub-sourced triggers
  # need no roles/eventarc.eventReceiver.)
  for_each = google_cloudfunctions2_function.fn
  project  = local.project
  location = each.value.location
  service  = each.value.name
  role     = "roles/run.invoker"
  member   = google_service_account.trigger.member
}

# --- Google's service agents ----------------------------------------------------------------

# Vertex AI's service agent (service-<number>@gcp-sa-aiplatform.iam.gserviceaccount.com) reads
# a version's artifact_uri, now in the registry bucket, when the gatekeeper uploads it to Vertex
# AI Model Registry (models.upload without a serviceAccount reads as the service agent), and
# copies it for the endpoint's serving container at deploy time. Its own project-level role,
# roles/aiplatform.serviceAgent, reads this project's buckets, which is how it read the
# artifacts bucket before: no grant here. (A bucket in another project would need
# roles/storage.objectViewer for it on that bucket.) The caller needs no storage role for it.

resource "google_pubsub_topic_iam_member" "gcs_publishes_data_arrivals" {
  # Why: the data bucket's OBJECT_FINALIZE notifications are published by the project's
  # Cloud Storage service agent, to this topic only.
  project = local.project
  topic   = google_pubsub_topic.topic["data_arrivals"].name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

data "google_storage_project_service_account" "gcs" {
  project    = local.project
  depends_on = [google_project_service.enabled]
}

resource "google_service_account_iam_member" "pubsub_signs_for_trigger" {
  # Why: Pub/Sub mints the OIDC token of each push to a function as the trigger account
  # (granted automatically only to Pub/Sub service agents created after April 2021).
  service_account_id = google_service_account.trigger.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent

  depends_on = [google_project_service_identity.agent]
}

resource "google_pubsub_topic_iam_member" "pubsub_dead_letters" {
  # Why: after delivery.max_delivery_attempts failed pushes, the Pub/Sub service agent
  # forwards the message to the function topic's dead-letter topic.
  for_each = local.function_topics
  project  = local.project
  topic    = google_pubsub_topic.dead_letter[each.value].name
  role     = "roles/pubsub.publisher"
  member   = local.pubsub_service_agent

  depends_on = [google_project_service_identity.agent]
}

# Forwarding to a dead-letter topic also acks the message on its source subscription, so
# the Pub/Sub service agent needs roles/pubsub.subscriber there. Those are the functions'
# Eventarc subscriptions, whose names are output-only and unknown at plan time: the grant is
# made on each of them, and on nothing else, by the dead-letter commands that scripts/deploy
# runs after the apply (outputs.tf dead_letter_commands), not project-wide.

# --- the build account ----------------------------------------------------------------------

resource "google_project_iam_member" "build_writes_logs" {
  # Why: Cloud Build writes the build logs of the functions and of the component image
  # (infra/cloudbuild.yaml sets logging: CLOUD_LOGGING_ONLY).
  project = local.project
  role    = "roles/logging.logWriter"
  member  = google_service_account.build.member
}

resource "google_artifact_registry_repository_iam_member" "build_pushes_images" {
  # Why: the builds push the functions' images (build_config.docker_repository) and the
  # component image into this repository, and only this one.
  project    = local.project
  location   = google_artifact_registry_repository.components.location
  repository = google_artifact_registry_repository.components.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.build.member
}

resource "google_storage_bucket_iam_member" "build_reads_sources" {
  # Why: the builds read their sources: the functions' zip (functions/) and the component
  # image's context staged by `gcloud builds submit` (cloudbuild/); no other object.
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.build.member

  condition {
    title      = "build-sources-only"
    expression = "resource.name.startsWith(\"projects/_/buckets/${local.artifacts_bucket}/objects/functions/\") || resource.name.startsWith(\"projects/_/buckets/${local.artifacts_bucket}/objects/cloudbuild/\")"
  }
}

resource "google_project_iam_member" "build_reads_gcf_sources" {
  # Why: Cloud Functions copies the source to its own gcf-v2-sources-<number>-<region> bucket
  # and builds from there; that bucket is Google-created, so the grant is conditioned on it.
  project = local.project
  role    = "roles/storage.objectViewer"
  member  = google_service_account.build.member

  condition {
    title      = "gcf-v2-sources-only"
    expression = "resource.name.startsWith(\"projects/_/buckets/gcf-v2-sources-${data.google_project.this.number}-\")"
  }
}

# --- backend kfp on GKE ---------------------------------------------------------------------

resource "google_service_account_iam_member" "kfp_runs_as_pipelines" {
  # Why: backend kfp on GKE: the pipeline pods run as the Kubernetes service account
  # var.kfp_workload_identity; Workload Identity lets it act as the pipelines' account, and
  # so have exactly that account's grants above (docs/deploy-gcp.md "backend: kfp").
  count              = var.kfp_workload_identity == null ? 0 : 1
  service_account_id = google_service_account.pipelines.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.project}.svc.id.goog[${coalesce(var.kfp_workload_identity, "-/-")}]"
}
