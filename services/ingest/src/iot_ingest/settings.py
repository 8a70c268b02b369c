"""Settings of the ingest service."""

from __future__ import annotations

from typing import Annotated

import msgspec

from iot_common.settings import BaseSettings, Port


class IngestSettings(BaseSettings, frozen=True, kw_only=True):
    ingest_http_port: Port = 8002
    mqtt_share_group: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "ingest"
    mqtt_client_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")] = ""
    ingest_auto_register: bool = False
