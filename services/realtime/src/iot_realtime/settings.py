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
    realtime_close_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    """How long a closing handshake may take before the socket is cut."""
