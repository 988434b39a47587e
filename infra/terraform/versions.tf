terraform {
  # 1.5: lifecycle preconditions, startswith() and check blocks are all older than this.
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.x: google_cloudfunctions2_function build_config.service_account / docker_repository,
      # default_labels and Artifact Registry cleanup policies are all in every 6.x release.
      version = "~> 6.14"
    }
    # Only for google_project_service_identity (main.tf): the service agents, created up front.
    google-beta = {
      source  = "hashicorp/google-beta"
      version = "~> 6.14"
    }
  }
}

provider "google" {
  project        = local.project
  region         = local.region
  default_labels = local.labels
}

provider "google-beta" {
  project        = local.project
  region         = local.region
  default_labels = local.labels
}
