"""Settings of the realtime service (``IOT_REALTIME_*`` plus the shared web settings)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from iot_common.settings import Port, WebSettings


class RealtimeSettings(WebSettings, frozen=True, kw_only=True):
    realtime_port: Port = 8001
    realtime_auth_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    """How long a client without ``?token=`` has to send its ``auth`` frame."""
    realtime_queue_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    """Outgoing frames held per connection; one more and the client is dropped (close 4008)."""
    realtime_heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    """Interval of WebSocket pings; a peer that does not answer within half of it is closed."""
    realtime_max_frame_bytes: Annotated[int, msgspec.Meta(ge=256, le=1_048_576)] = 65536
    """Largest client frame processed; a larger one gets an ``error`` frame (``too_large``)."""
    realtime_max_subscriptions: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    """Devices one connection may subscribe to at once."""
    realtime_max_subscriptions_per_principal: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000
    """Subscriptions one credential (user or API key) may hold at once, over all its connections here."""
    realtime_max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 20_000
    """Open WebSockets of this process (authenticated or not); one more is refused with HTTP 503."""
    realtime_max_connections_per_principal: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    """Open connections of one credential (user or API key) here; one more is closed with 4029."""
    realtime_device_cache_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 60.0
    """How long a device found in PostgreSQL is remembered as existing (0: ask every time)."""
    realtime_auth_failures_per_minute: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 20
    """Failed API-key authentications one client address (an IPv6 /64) may make per minute, in bursts of as
    many; past that its API keys are refused with 4029 before any database lookup (0: no limit)."""
    realtime_device_checks_per_minute: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 120
    """Subscribe frames per credential and minute that ask PostgreSQL about device ids (ids found lately are
    not asked again); past that they get an ``error`` frame ``rate_limited`` (0: no limit)."""
    realtime_max_backfill: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 1000
    """Stored readings sent at most for one subscribe frame with ``since`` (gap-free resume); past it the
    most recent ones are sent and the ``ack`` says ``truncated`` (0: none are ever sent)."""
    realtime_close_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    """How long a closing handshake may take before the socket is cut."""
