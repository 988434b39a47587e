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
  description = "Memory of each Cloud Function (the drift check loads pandas and scikit-learn)."
  type        = string
  default     = "1Gi"
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
