"""Settings of the ingest service (``IOT_*`` variables, documented in docs/configuration.md)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from iot_common.settings import BaseSettings, BindHost, Port
from iot_common.tenancy import TENANT_NAME_PATTERN


class IngestSettings(BaseSettings, frozen=True, kw_only=True):
    ingest_http_port: Port = 8002
    bind_host: BindHost = "0.0.0.0"
    """Address of the HTTP listener: health, metrics and HTTP device ingest (``IOT_BIND_HOST``); ``make run``
    sets 127.0.0.1."""
    mqtt_share_group: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}(?!\n)$")] = "ingest"
    """MQTT 5 shared-subscription group (``$share/{group}/...``); empty: plain subscriptions, for a broker
    without shared subscriptions (then run a single ingest process: each one would get every message)."""
    mqtt_client_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{0,64}(?!\n)$")] = ""
    mqtt_session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)] = 86400
    ingest_auto_register: bool = False
    ingest_auto_register_tenant: Annotated[str, msgspec.Meta(pattern=TENANT_NAME_PATTERN)] = "default"
    """Name of the tenant that devices registered by ``IOT_INGEST_AUTO_REGISTER`` join."""
    ingest_batch_size: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 2000
    ingest_batch_delay_ms: Annotated[int, msgspec.Meta(ge=0, le=60000)] = 0
    """0: adaptive batching (a batch is committed as soon as the previous commit is done); more: a batch
    also waits up to this long after its first message for more (fewer, larger commits)."""
    ingest_max_in_flight: Annotated[int, msgspec.Meta(ge=2, le=65535)] = 20000
    ingest_max_payload_bytes: Annotated[int, msgspec.Meta(ge=64, le=16 * 1024 * 1024)] = 65536
    ingest_max_readings: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 1000
    ingest_max_metrics: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100
    ingest_max_text_length: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 64
    ingest_max_future_s: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 600
    ingest_device_cache_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 60
    ingest_shutdown_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 20
    ingest_rules_refresh_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 60
    ingest_alert_queue: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    ingest_action_workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    ingest_action_queue: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    ingest_webhook_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    ingest_webhook_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    ingest_webhook_backoff_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.5
    ingest_command_puback_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    ingest_command_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] = 300
    ingest_command_expiry_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    ingest_stuck_after_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0
    """``/readyz`` fails while a message has been in flight (not acknowledged) for longer than this."""
    ingest_max_readings_per_device_s: Annotated[float, msgspec.Meta(ge=0, le=1_000_000)] = 1000.0
    """Per-device quota (token bucket refill rate, readings/s); 0 turns the quota off."""
    ingest_max_readings_per_device_burst: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 10_000
    """Bucket size: readings a device may send at once above the rate (keep it >= max_readings)."""
    ingest_heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    """How often a replica records in Redis that it is alive (the share group's membership)."""
    ingest_peer_dead_after_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 15.0
    """A replica silent this long is taken as gone: a peer adopts its MQTT session and empties it."""
    ingest_http_max_readings: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000
    """Readings in one HTTP ingest request (``POST /ingest/v1/devices/{id}/telemetry``), for backfill."""
    ingest_http_max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 8 * 1024 * 1024
    """Bytes of an HTTP ingest body, as sent and once decompressed (gzip)."""
    ingest_http_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    """Time an HTTP ingest request may take: reading the body, then waiting for the commit (503 after)."""
    ingest_http_max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 64
    """HTTP ingest requests handled at once; more are answered 503 with ``Retry-After``."""
    ingest_http_auth_cache_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    """How long a device credential looked up in PostgreSQL is trusted (a revocation takes this long)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ingest_max_readings_per_device_s and (
            self.ingest_max_readings_per_device_burst < self.ingest_max_readings
        ):
            # A full batch message could never pass: every one would be dead-lettered as rate_limited.
            raise ValueError(
                "IOT_INGEST_MAX_READINGS_PER_DEVICE_BURST must be at least IOT_INGEST_MAX_READINGS "
                "(a message of that many readings must fit in the bucket)"
            )
        if self.ingest_peer_dead_after_s <= 2 * self.ingest_heartbeat_s:
            raise ValueError(
                "IOT_INGEST_PEER_DEAD_AFTER_S must be more than twice IOT_INGEST_HEARTBEAT_S "
                "(a replica that misses one heartbeat is not gone)"
            )
        if 0 < self.mqtt_session_expiry_s <= self.ingest_peer_dead_after_s:
            raise ValueError(
                "IOT_MQTT_SESSION_EXPIRY_S must be longer than IOT_INGEST_PEER_DEAD_AFTER_S: a silent "
                "replica's session must still exist when a peer adopts it"
            )
