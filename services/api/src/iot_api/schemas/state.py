"""A device's state: desired and reported documents, their delta, the version, and the history."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from iot_api.schemas.common import Page


class DeviceStateView(msgspec.Struct, frozen=True):
    """A device's state. ``delta``: the desired keys whose reported value differs (nested objects compared
    key by key). ``version`` increases on every change of either side (0: never set); it is the ETag."""

    device_id: str
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any]
    version: int
    desired_at: datetime | None
    reported_at: datetime | None


class StatePatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A JSON merge patch (RFC 7386) of the desired state: a key set to ``null`` is removed."""

    desired: dict[str, Any]


class StateChange(msgspec.Struct, frozen=True):
    """One change of a device's state: the version it made, the side, the merge patch as sent, who sent
    it (``user:<id>``, ``key:<id>`` or ``device``) and, for a report, the desired version the device said
    it applied."""

    version: int
    side: Literal["desired", "reported"]
    patch: dict[str, Any]
    actor: str
    applied_version: int | None
    at: datetime


class StateHistoryPage(Page, frozen=True):
    items: list[StateChange]
