# Topics, dead-letter topics and pull subscriptions: the same ones retrain/topology.py creates
# in the local stack. The push subscriptions of the local stack are, in the cloud, the
# subscriptions that Eventarc creates for the functions' triggers (functions.tf).

resource "google_pubsub_topic" "topic" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption at rest; messages hold event metadata and metrics, not data rows. Add kms_key_name where an org policy requires CMEK.
  for_each = local.topics

  project = local.project
  name    = each.value

  depends_on = [google_project_service.enabled]
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption at rest; dead letters are the same event messages as their topics. Add kms_key_name where an org policy requires CMEK.
  for_each = local.dead_letter_topics

  project = local.project
  name    = each.value

  depends_on = [google_project_service.enabled]
}

locals {
  # Topic name -> topic id, for the subscriptions below.
  topic_ids = merge(
    { for field, topic in google_pubsub_topic.topic : topic.name => topic.id },
    { for field, topic in google_pubsub_topic.dead_letter : topic.name => topic.id },
  )
}

resource "google_pubsub_subscription" "pull" {
  for_each = local.pull_subscriptions

  project              = local.project
  name                 = each.key
  topic                = local.topic_ids[each.value]
  ack_deadline_seconds = local.delivery.ack_deadline_seconds

  # Dead letters wait for an operator: keep them as long as Pub/Sub allows (7 days), and
  # never delete the subscription for being idle (the default is after 31 days).
  message_retention_duration = "604800s"
  expiration_policy {
    ttl = ""
  }
}
