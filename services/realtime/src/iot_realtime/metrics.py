"""Prometheus metrics of the realtime service, exposed on ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CONNECTIONS = Gauge("iot_realtime_connections", "Open, authenticated WebSocket connections")
SOCKETS = Gauge(
    "iot_realtime_sockets", "Open WebSockets, authenticated or not (counted by IOT_REALTIME_MAX_CONNECTIONS)"
)
SUBSCRIPTIONS = Gauge(
    "iot_realtime_subscriptions", "Subscriptions held by clients (one per connection and device or '*')"
)
REDIS_CHANNELS = Gauge(
    "iot_realtime_redis_channels", "Device channels (and the '*' pattern) this process listens to on Redis"
)
MESSAGES_IN = Counter("iot_realtime_messages_in", "Events received from Redis pub/sub")
MESSAGES_OUT = Counter("iot_realtime_messages_out", "Frames sent to WebSocket clients")
CLIENT_FRAMES = Counter("iot_realtime_client_frames", "Frames received from clients, by outcome", ["outcome"])
DROPPED_CONNECTIONS = Counter(
    "iot_realtime_dropped_connections", "Clients dropped because their outgoing queue overflowed"
)
DROPPED_MESSAGES = Counter(
    "iot_realtime_dropped_messages", "Frames not delivered because the client's queue overflowed"
)
REFUSED = Counter(
    "iot_realtime_refused",
    "Connections refused, by close code (or 503: refused before the upgrade)",
    ["code"],
)
REFUSED_SUBSCRIPTIONS = Counter(
    "iot_realtime_refused_subscriptions", "Subscribe frames refused, by error code", ["code"]
)
API_KEY_LOOKUPS = Counter(
    "iot_realtime_api_key_lookups", "API keys looked up in PostgreSQL (unknown prefixes remembered are not)"
)
REDIS_RECONNECTS = Counter("iot_realtime_redis_reconnects", "Reconnections of the Redis pub/sub listener")
BACKFILL_READINGS = Counter(
    "iot_realtime_backfill_readings", "Stored readings sent for subscribe frames with since (gap-free resume)"
)
BACKFILL_TRUNCATED = Counter(
    "iot_realtime_backfill_truncated",
    "Subscribe frames with since answered truncated (more than IOT_REALTIME_MAX_BACKFILL, or no database)",
)
BACKFILL_DUPLICATES = Counter(
    "iot_realtime_backfill_duplicates", "Live events dropped because the backfill had sent their reading"
)
