"""Commands to devices and their state."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from iot_api.schemas.common import Page
from iot_common.commands import CommandName, CommandTtl
from iot_common.messages import CommandState


class CommandCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A command for a device; it expires ``ttl_s`` s after creation (default ``IOT_API_COMMAND_TTL_S``),
    whether it is still queued for an offline device or waiting for the device's answer."""

    name: CommandName
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_s: CommandTtl | None = None


class Command(msgspec.Struct, frozen=True):
    """A command and its state: ``queued`` while its device is offline (published when it comes online,
    in creation order), ``sent`` once the broker took it, ``acked``/``failed`` from the device's
    answer, ``expired`` when no answer came before ``expires_at``; ``failed`` with ``error`` also when the
    broker could not be reached."""

    id: str
    device_id: str
    name: str
    params: dict[str, Any]
    state: CommandState
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


class CommandPage(Page, frozen=True):
    items: list[Command]
