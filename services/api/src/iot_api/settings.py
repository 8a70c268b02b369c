"""Settings of the API service."""

from __future__ import annotations

from iot_common.settings import Port, WebSettings


class ApiSettings(WebSettings, frozen=True, kw_only=True):
    api_port: Port = 8000
