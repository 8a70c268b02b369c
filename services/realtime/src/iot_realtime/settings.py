"""Settings of the realtime service."""

from __future__ import annotations

from iot_common.settings import Port, WebSettings


class RealtimeSettings(WebSettings, frozen=True, kw_only=True):
    realtime_port: Port = 8001
