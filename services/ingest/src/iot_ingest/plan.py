"""What one batch of deliveries becomes in the database: pure functions, unit-tested without PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from iot_common.messages import CommandAck, CommandEvent, DeviceStatus, MetricValue, Reading
from iot_ingest.payload import Reject, RejectReason

PAYLOAD_EXCERPT_CHARS = 1024
"""Dead letters keep at most this many characters of the payload (``payload_size`` keeps the real size)."""


@dataclass(slots=True)
class Delivery:
    """One MQTT message, already parsed: what the handler hands to the batcher."""

    topic: str
    device_id: str | None
    received_at: datetime
    payload: bytes
    readings: list[Reading] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    status: DeviceStatus | None = None
    ack: CommandAck | None = None

    @property
    def needs_device(self) -> bool:
        """Whether something of it is stored against its device (so the device must be known)."""
        return self.device_id is not None and (bool(self.readings) or self.status is not None)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    device_id: str | None
    reason: RejectReason
    detail: str
    payload: str
    payload_size: int
    received_at: datetime


@dataclass(slots=True)
class Plan:
    """Rows to write for a batch, in one transaction."""

    readings: list[Reading] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    last_seen: dict[str, datetime] = field(default_factory=dict)
    statuses: dict[str, tuple[DeviceStatus, datetime]] = field(default_factory=dict)
    acks: list[tuple[str, CommandAck]] = field(default_factory=list)
    """(device id, answer) of command acks; applied to ``commands`` in the same transaction."""
    command_events: list[CommandEvent] = field(default_factory=list)
    """Filled by the writer: the commands an ack changed, to publish after the commit."""
    new_rows: int = 0
    """Filled by the writer: telemetry rows that were not stored before (duplicates excluded)."""

    def merge(self, other: Plan) -> None:
        """Add ``other`` (a later part of the batch, written on its own) to this plan."""
        self.readings += other.readings
        self.dead_letters += other.dead_letters
        self.last_seen.update(other.last_seen)
        self.statuses.update(other.statuses)
        self.acks += other.acks
        self.command_events += other.command_events
        self.new_rows += other.new_rows


def payload_excerpt(payload: bytes) -> str:
    """Text safe for a PostgreSQL ``text`` column (which refuses NUL), cut to the excerpt length."""
    text = payload[: PAYLOAD_EXCERPT_CHARS * 4].decode("utf-8", errors="replace")[:PAYLOAD_EXCERPT_CHARS]
    return text.replace("\x00", "\\u0000")


def safe_text(text: str) -> str:
    """``text`` without what PostgreSQL ``text`` refuses: NUL, and unpaired surrogates (escaped)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


def dead_letter(delivery: Delivery, reason: RejectReason, detail: str) -> DeadLetter:
    return DeadLetter(
        topic=safe_text(delivery.topic),
        device_id=delivery.device_id,
        reason=reason,
        detail=safe_text(detail[:1000]),
        payload=payload_excerpt(delivery.payload),
        payload_size=len(delivery.payload),
        received_at=delivery.received_at,
    )


def plan_batch(batch: list[Delivery], unknown: set[str]) -> Plan:
    """Readings, dead letters and device updates for ``batch``; devices in ``unknown`` are refused.

    A device's status is the last one in the batch (messages are in arrival order); ``last_seen`` is the
    latest receipt time of anything stored for the device, never an offline will message.
    """
    plan = Plan()
    for delivery in batch:
        for reject in delivery.rejects:
            plan.dead_letters.append(dead_letter(delivery, reject.reason, reject.detail))
        if delivery.ack is not None and delivery.device_id is not None:
            plan.acks.append((delivery.device_id, delivery.ack))
        if not delivery.needs_device:
            continue
        device_id = delivery.device_id
        assert device_id is not None
        if device_id in unknown:
            plan.dead_letters.append(
                dead_letter(delivery, "unknown_device", f"device {device_id!r} is not registered")
            )
            continue
        plan.readings.extend(delivery.readings)
        if delivery.status is not None:
            plan.statuses[device_id] = (delivery.status, delivery.received_at)
        if delivery.readings or delivery.status == "online":
            seen = plan.last_seen.get(device_id)
            if seen is None or delivery.received_at > seen:
                plan.last_seen[device_id] = delivery.received_at
    return plan


def latest_values(readings: list[Reading]) -> dict[str, dict[str, tuple[datetime, MetricValue]]]:
    """Per device and metric, the newest value among ``readings`` (ties: the later reading wins)."""
    latest: dict[str, dict[str, tuple[datetime, MetricValue]]] = {}
    for reading in readings:
        metrics = latest.setdefault(reading.device_id, {})
        for name, value in reading.metrics.items():
            current = metrics.get(name)
            if current is None or reading.ts >= current[0]:
                metrics[name] = (reading.ts, value)
    return latest


def ts_sort_key(ts: datetime) -> str:
    """A UTC timestamp as ``YYYY-MM-DDTHH:MM:SS`` plus 6 digits of microseconds: compares as text.

    The Redis script that guards the latest-values hash derives the same key from the stored value.
    """
    utc = ts.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}{utc.microsecond:06d}"
