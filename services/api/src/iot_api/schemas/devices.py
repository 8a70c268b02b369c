"""Devices: what a client registers and changes, and what it reads back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from iot_api.schemas.common import Page, Text
from iot_common.messages import DeviceStatus
from iot_common.topics import DeviceId, DeviceType


class Device(msgspec.Struct, frozen=True):
    id: str
    name: str
    type: str
    status: DeviceStatus
    attributes: dict[str, Any]
    last_seen: datetime | None
    created_at: datetime
    updated_at: datetime


class DeviceCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new device. Without ``id`` the API generates one (``dev-`` and 16 hex digits)."""

    id: DeviceId | None = None
    name: Text = ""
    type: DeviceType = "generic"
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class DeviceUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Fields to change; a field left out (or null) keeps its value. ``attributes`` replaces the whole map."""

    name: Text | None = None
    type: DeviceType | None = None
    status: DeviceStatus | None = None
    attributes: dict[str, Any] | None = None


class DevicePage(Page, frozen=True):
    items: list[Device]
