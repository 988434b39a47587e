# Paths are relative to this folder: run Terraform as `terraform -chdir=infra/terraform ...`
# from the repository root (as `make deploy` does).

variable "config_path" {
  description = "The one configuration file, retrain.yaml. Every name below is read from it."
  type        = string
  default     = "../../retrain.yaml"
}

variable "functions_zip" {
  description = "The Cloud Functions source zip that `make deploy` builds (main.py, requirements.txt, retrain.yaml and the packages)."
  type        = string
  default     = "../../build/functions.zip"
}

variable "pipelines_dir" {
  description = "Folder of the compiled pipelines that `make deploy` writes, one <model>.yaml per model."
  type        = string
  default     = "../../build/pipelines"
}

variable "function_memory" {
  description = "Memory of each Cloud Function, by entry point; docs/deploy-gcp.md \"Function memory\" has the figures. on_data_arrival reads arriving objects (a sample of at most 32 MiB) into pandas and loads the champion; on_schedule's sweep checks arrivals whose notification was lost, the same way. on_drift and gatekeeper only submit runs and move the registry (the Vertex AI SDK: about 220 MiB at peak). /tmp counts against it."
  type        = map(string)
  default = {
    on_data_arrival = "1Gi"
    on_schedule     = "1Gi"
    on_drift        = "512Mi"
    gatekeeper      = "512Mi"
  }

  validation {
    condition     = toset(keys(var.function_memory)) == toset(["on_data_arrival", "on_drift", "on_schedule", "gatekeeper"])
    error_message = "function_memory names each of the four entry points: on_data_arrival, on_drift, on_schedule, gatekeeper."
  }
}

variable "function_cpu" {
  description = "vCPUs of each Cloud Function instance."
  type        = string
  default     = "1"
}

variable "function_timeout_seconds" {
  description = "Time limit of one function call. The triggers only decide and submit (the run is asynchronous); the gatekeeper waits for an endpoint deploy, hence the most Eventarc allows."
  type        = number
  default     = 540

  validation {
    condition     = var.function_timeout_seconds >= 10 && var.function_timeout_seconds <= 540
    error_message = "Event-driven functions take 10 to 540 seconds."
  }
}

variable "function_max_instances" {
  description = "Upper bound on instances of each function."
  type        = number
  default     = 10
}

variable "noncurrent_version_days" {
  description = "Days to keep overwritten or deleted object versions (lineage names data by object generation)."
  type        = number
  default     = 90
}

variable "access_log_days" {
  description = "Days to keep the buckets' usage logs."
  type        = number
  default     = 90
}

variable "firestore_location" {
  description = "Location of the Firestore database (https://cloud.google.com/firestore/docs/locations); null means retrain.yaml's region. Set a multi-region (nam5, eur3) or a nearby region where the region has no Firestore. It cannot be changed once the database exists."
  type        = string
  default     = null
}

variable "usage_logs" {
  description = "Write the buckets' usage logs to the access-logs bucket. Cloud Storage writes them as group:cloud-storage-analytics@google.com, which an organisation policy of domain-restricted sharing (iam.allowedPolicyMemberDomains) refuses: set false there."
  type        = bool
  default     = true
}

variable "kfp_workload_identity" {
  description = "backend kfp on GKE: the Kubernetes service account, NAMESPACE/NAME (e.g. kubeflow/pipeline-runner), whose pods run the pipeline steps. Terraform lets it act as the pipelines' account through Workload Identity (iam.tf); null grants nothing (backend vertex, or a KFP elsewhere)."
  type        = string
  default     = null

  validation {
    condition     = var.kfp_workload_identity == null || can(regex("^[a-z0-9-]+/[a-z0-9-]+$", var.kfp_workload_identity))
    error_message = "kfp_workload_identity is NAMESPACE/NAME, e.g. kubeflow/pipeline-runner."
  }
}

variable "functions_vpc_connector" {
  description = "backend kfp with a private KFP host: the Serverless VPC Access connector (projects/PROJECT/locations/REGION/connectors/NAME) through which the functions reach it; only private ranges go through it. null: the functions reach the host over the internet."
  type        = string
  default     = null
}
