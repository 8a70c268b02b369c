"""Prometheus metrics of the ingest service, served on ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_RECEIVED = Counter(
    "iot_ingest_messages_received",
    "MQTT messages received, by kind (telemetry, status, command_ack, retained, other)",
    ["kind"],
)
READINGS_STORED = Counter("iot_ingest_readings_stored", "Readings committed to PostgreSQL")
ROWS_STORED = Counter("iot_ingest_rows_stored", "New telemetry rows (one per metric); duplicates excluded")
ROWS_DUPLICATE = Counter(
    "iot_ingest_rows_duplicate", "Telemetry rows already stored (a redelivered message), skipped"
)
REJECTED = Counter(
    "iot_ingest_rejected", "Readings or messages written as dead letters, by reason", ["reason"]
)
DEVICES_REGISTERED = Counter("iot_ingest_devices_registered", "Unknown devices registered automatically")
TENANT_QUOTA_UNCHECKED = Counter(
    "iot_ingest_tenant_quota_unchecked",
    "Batches stored without checking their tenants' readings limits (Redis unavailable)",
)
BATCH_SIZE = Histogram(
    "iot_ingest_batch_size",
    "Deliveries (MQTT messages, HTTP ingest requests) per committed batch",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
COMMIT_SECONDS = Histogram(
    "iot_ingest_commit_seconds",
    "Time to write and commit one batch (the successful attempt)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
IN_FLIGHT = Gauge("iot_ingest_in_flight", "Messages received and not yet acknowledged")
OLDEST_IN_FLIGHT = Gauge(
    "iot_ingest_oldest_in_flight_seconds", "Age of the oldest message received and not yet acknowledged"
)
HANDLER_ERRORS = Counter(
    "iot_ingest_handler_errors",
    "Exceptions while handling a message (dead-lettered and acknowledged), by stage (translate, store)",
    ["stage"],
)
STORAGE_RETRIES = Counter("iot_ingest_storage_retries", "Batch writes that failed and were retried")
REDIS_FAILURES = Counter(
    "iot_ingest_redis_failures", "Batches whose Redis update (latest values, publish) failed; storage kept"
)
MQTT_CONNECTED = Gauge("iot_ingest_mqtt_connected", "1 while connected to the MQTT broker")

RULES_LOADED = Gauge("iot_ingest_rules_loaded", "Enabled alert rules in this replica's cache")
RULE_RELOADS = Counter("iot_ingest_rule_reloads", "Rule cache reloads, by outcome (ok, failed)", ["outcome"])
ALERTS_OPENED = Counter("iot_ingest_alerts_opened", "Alerts this replica opened (stored and published)")
ALERTS_RESOLVED = Counter("iot_ingest_alerts_resolved", "Alerts this replica resolved (stored and published)")
ALERT_STORE_RETRIES = Counter(
    "iot_ingest_alert_store_retries", "Failed writes of alert transitions (retried with backoff)"
)
ALERT_ERRORS = Counter(
    "iot_ingest_alert_errors",
    "Alert work given up, by stage: dropped (queue full), refused (data error), publish (Redis)",
    ["stage"],
)
ALERT_QUEUE = Gauge("iot_ingest_alert_queue", "Committed batches waiting for rule evaluation")
ACTIONS = Counter(
    "iot_ingest_actions", "Rule actions by kind and outcome (succeeded, failed, dropped)", ["kind", "outcome"]
)
ACTION_QUEUE = Gauge("iot_ingest_action_queue", "Actions queued and not started yet")
ACTIONS_HELD = Gauge(
    "iot_ingest_actions_held",
    "Actions waiting for an earlier action of the same rule and device (typically on another replica)",
)
COMMAND_ACKS = Counter(
    "iot_ingest_command_acks",
    "Command answers from devices, by outcome (acked, failed, ignored)",
    ["outcome"],
)
COMMANDS_EXPIRED = Counter("iot_ingest_commands_expired", "Commands expired without an answer")
SESSIONS_ADOPTED = Counter(
    "iot_ingest_sessions_adopted",
    "Sessions of silent replicas this replica resumed and emptied, by outcome (emptied, taken_back, failed)",
    ["outcome"],
)
QUEUED_COMMANDS = Counter(
    "iot_ingest_queued_commands",
    "Queued commands taken when their device came online, by outcome (sent, requeued, failed)",
    ["outcome"],
)
ONLINE_HOOK_ERRORS = Counter(
    "iot_ingest_online_hook_errors", "Device-came-online hooks that raised, by hook", ["hook"]
)
HTTP_REQUESTS = Counter(
    "iot_ingest_http_requests",
    "HTTP ingest requests (POST /ingest/v1/devices/{id}/...), by route and answer status",
    ["route", "status"],
)
HTTP_ACTIVE = Gauge("iot_ingest_http_active", "HTTP ingest requests being handled")
