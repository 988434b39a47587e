# The Firestore (Native mode) database that holds the run ledger and the model registry's
# records (retrain/statedb.py, docs/reliability.md). Its name is retrain.yaml's `database`,
# which the code opens as firestore.Client(project=..., database=...). The functions' account
# reads and writes it; the pipelines' account and the prediction server only read it
# (iam.tf, each grant conditioned on this database alone).
resource "google_firestore_database" "state" {
  project     = local.project
  name        = local.database
  location_id = local.firestore_location # the region, unless var.firestore_location says otherwise
  type        = "FIRESTORE_NATIVE"

  # Every change of state is one batched commit whose writes carry preconditions (create only
  # if absent, update or delete only if unchanged since read): those hold in either mode, and
  # the code uses no transactions. OPTIMISTIC also means no read holds a lock: in PESSIMISTIC
  # mode a read-write transaction locks what it reads and makes other writers wait, so any
  # principal that may begin one (datastore.viewer includes datastore.databases.get, as the
  # pipelines' account has) could stall the ledger. Here a crashed or slow reader blocks no one.
  concurrency_mode = "OPTIMISTIC"

  # The ledger and registry are the service's memory: a bad write or a bad deploy of the code
  # can be read back (and the database cloned) as of any minute of the last 7 days.
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  # Neither the console nor the API can delete it while this is on; `terraform destroy`
  # leaves it (deletion_policy ABANDON): delete it by hand, deliberately, like a full bucket.
  delete_protection_state = "DELETE_PROTECTION_ENABLED"
  deletion_policy         = "ABANDON"

  depends_on = [google_project_service.enabled]
}
