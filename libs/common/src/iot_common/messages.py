"""Message types shared by the services.

``MetricValue``/``Reading`` are the normalized form of what devices send; the ``*Event`` structs are the
envelope published on a device's Redis channel (tagged by ``type``) and forwarded as-is to WebSocket
clients, so the JSON on the wire is exactly these structs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

METRIC_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}(?!\n)$"
"""Metric names: 1-64 characters, letters, digits and ``_ . -``, not starting with a digit."""

MetricName = Annotated[str, msgspec.Meta(pattern=METRIC_NAME_PATTERN, examples=["temperature"])]
MetricValue = float | str
"""A numeric value (booleans become 1.0/0.0) or a short text such as a status ``"ok"``."""

DeviceStatus = Literal["unknown", "online", "offline"]
Severity = Literal["info", "warning", "critical"]
AlertState = Literal["open", "resolved"]
CommandState = Literal["queued", "pending", "sent", "acked", "failed", "expired"]


class Reading(msgspec.Struct, frozen=True):
    """One normalized reading: a device's metrics at one instant."""

    device_id: str
    ts: datetime
    metrics: dict[str, MetricValue]


class LatestValue(msgspec.Struct, frozen=True):
    """Value of one metric in a device's latest-values hash."""

    value: MetricValue
    ts: datetime


class TelemetryEvent(msgspec.Struct, frozen=True, tag="telemetry", tag_field="type"):
    device_id: str
    ts: datetime
    metrics: dict[str, MetricValue]


class StatusEvent(msgspec.Struct, frozen=True, tag="status", tag_field="type"):
    device_id: str
    status: DeviceStatus
    ts: datetime


class AlertEvent(msgspec.Struct, frozen=True, tag="alert", tag_field="type"):
    id: str
    rule_id: str
    device_id: str
    metric: str
    severity: Severity
    state: AlertState
    message: str
    value: MetricValue | None
    threshold: float
    opened_at: datetime
    resolved_at: datetime | None = None
    acked_at: datetime | None = None


class CommandEvent(msgspec.Struct, frozen=True, tag="command", tag_field="type"):
    id: str
    device_id: str
    name: str
    state: CommandState
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    updated_at: datetime | None = None


class StateEvent(msgspec.Struct, frozen=True, tag="state", tag_field="type"):
    """A device's state after a change (docs/device-state.md)."""

    device_id: str
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any]
    version: int


DeviceEvent = TelemetryEvent | StatusEvent | AlertEvent | CommandEvent | StateEvent
"""Everything published on a device's Redis channel."""

event_encoder = msgspec.json.Encoder()
event_decoder: msgspec.json.Decoder[DeviceEvent] = msgspec.json.Decoder(DeviceEvent)


def encode_event(event: DeviceEvent) -> bytes:
    return event_encoder.encode(event)


def decode_event(data: bytes | str) -> DeviceEvent:
    return event_decoder.decode(data)


class CommandMessage(msgspec.Struct, frozen=True):
    """Payload published to a device on ``devices/commands/{device_id}``."""

    id: str
    name: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_at: datetime | None = None


class CommandAck(msgspec.Struct, frozen=True):
    """What a device answers on ``devices/commands/{device_id}/ack``."""

    id: str
    status: Literal["ok", "error"] = "ok"
    result: dict[str, Any] | None = None
    error: str | None = None
