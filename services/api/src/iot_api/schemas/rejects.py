"""Messages the ingest service refused (its dead letters)."""

from __future__ import annotations

from datetime import datetime

import msgspec

from iot_api.schemas.common import Page


class Reject(msgspec.Struct, frozen=True):
    id: int
    received_at: datetime
    topic: str
    device_id: str | None
    reason: str
    detail: str
    payload: str
    payload_size: int


class RejectPage(Page, frozen=True):
    items: list[Reject]
