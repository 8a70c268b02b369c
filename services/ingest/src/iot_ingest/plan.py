"""What one batch of deliveries becomes in the database: pure functions, unit-tested without PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from iot_common.messages import CommandAck, CommandEvent, DeviceStatus, MetricValue, Reading
from iot_common.state import DeviceState, ReportedMessage
from iot_ingest.payload import Reject, RejectReason

PAYLOAD_EXCERPT_CHARS = 1024
"""Dead letters keep at most this many characters of the payload (``payload_size`` keeps the real size)."""


@dataclass(slots=True)
class Outcome:
    """What became of a delivery whose sender waits for the answer (an HTTP request): filled by the writer
    once the batch is committed, never by an attempt that was rolled back."""

    stored: int = 0
    """Readings of the delivery in the committed batch (a duplicate of a stored reading counts: it is
    stored)."""
    refusal: Reject | None = None
    """Why its readings were not stored, when they were refused whole after parsing (``unknown_device``,
    ``tenant_quota``, ``storage_error``); its dead letters are in the same transaction."""


@dataclass(slots=True)
class Delivery:
    """One MQTT message or HTTP request, already parsed: what the edge hands to the batcher."""

    topic: str
    device_id: str | None
    received_at: datetime
    payload: bytes
    readings: list[Reading] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    status: DeviceStatus | None = None
    ack: CommandAck | None = None
    outcome: Outcome | None = None
    """Set by an edge that answers after the commit (HTTP); None for MQTT (its answer is the PUBACK)."""
    report: ReportedMessage | None = None
    redelivered: bool = False
    """The broker sent it before (MQTT DUP): its readings may be stored but not yet published."""

    @property
    def needs_device(self) -> bool:
        """Whether something of it is stored against its device (so the device must be known)."""
        return self.device_id is not None and (
            bool(self.readings) or self.status is not None or self.report is not None
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why nothing of a device's messages is stored, and the tenant their dead letters belong to (None:
    the device's own, if it has one)."""

    reason: RejectReason
    detail: str
    tenant_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    device_id: str | None
    reason: RejectReason
    detail: str
    payload: str
    payload_size: int
    received_at: datetime
    tenant_id: str | None = None
    """The tenant of the device; None for a device unknown to ingest (PostgreSQL's trigger then looks it
    up, and leaves it NULL for a device that does not exist: only platform admins see those)."""


@dataclass(slots=True)
class Plan:
    """Rows to write for a batch, in one transaction."""

    readings: list[Reading] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    last_seen: dict[str, datetime] = field(default_factory=dict)
    statuses: dict[str, tuple[DeviceStatus, datetime]] = field(default_factory=dict)
    acks: list[tuple[str, CommandAck]] = field(default_factory=list)
    """(device id, answer) of command acks; applied to ``commands`` in the same transaction."""
    command_events: list[tuple[str, CommandEvent]] = field(default_factory=list)
    """Filled by the writer: the commands an ack changed (with their tenant), to publish after the commit."""
    reports: list[tuple[str, ReportedMessage, Delivery]] = field(default_factory=list)
    """(device id, report, its message) of state reports, in arrival order; applied in the transaction."""
    state_events: list[tuple[str, DeviceState]] = field(default_factory=list)
    """Filled by the writer: (tenant, new state) of each report that changed a state, to publish after
    the commit."""
    tenants: dict[str, str] = field(default_factory=dict)
    """Tenant of each device with readings or a status in the plan: where its events are published."""
    new_rows: int = 0
    fresh: set[tuple[str, datetime]] | None = None
    """Filled by the writer when some rows of the batch were stored before (a redelivered message): the
    (device, ts) of the readings with a new row. None: every reading is new."""
    redelivered: set[tuple[str, datetime]] = field(default_factory=set)
    """(device, ts) of the readings of redelivered messages (MQTT DUP)."""
    """Filled by the writer: telemetry rows that were not stored before (duplicates excluded)."""
    came_online: list[str] = field(default_factory=list)
    """Filled by the writer: devices the batch set ``online`` (an ``online`` status, or a reading of a
    device marked ``offline``), for the "device came online" hooks (:mod:`iot_ingest.presence`)."""
    outcomes: list[tuple[Outcome, int, Reject | None]] = field(default_factory=list)
    """(outcome, readings stored, refusal) of the deliveries that carry an :class:`Outcome`; the writer
    copies them into the outcomes once the plan is committed."""

    def merge(self, other: Plan) -> None:
        """Add ``other`` (a later part of the batch, written on its own) to this plan."""
        if self.fresh is not None or other.fresh is not None:
            self.fresh = _fresh_keys(self) | _fresh_keys(other)
        self.redelivered |= other.redelivered
        self.readings += other.readings
        self.dead_letters += other.dead_letters
        self.last_seen.update(other.last_seen)
        self.statuses.update(other.statuses)
        self.acks += other.acks
        self.command_events += other.command_events
        self.reports += other.reports
        self.state_events += other.state_events
        self.tenants.update(other.tenants)
        self.new_rows += other.new_rows
        self.came_online += [d for d in other.came_online if d not in self.came_online]
        self.outcomes += other.outcomes

    def published(self) -> list[Reading]:
        """The readings to publish after the commit: those stored now, and those of a message the broker
        redelivered (its first delivery may have been stored by a replica that died before publishing it:
        at least once); not a reading stored before by another delivery of the same message that was
        itself published, e.g. the original a replica cut off from the network stores after the peer that
        adopted its session stored the redelivered copy (WebSocket clients would get it twice)."""
        if self.fresh is None:
            return self.readings
        keep = self.fresh | self.redelivered
        return [r for r in self.readings if (r.device_id, r.ts) in keep]

    def settle(self) -> None:
        """The plan is committed: tell the deliveries' senders what became of them."""
        for outcome, stored, refusal in self.outcomes:
            outcome.stored = stored
            outcome.refusal = refusal


def _fresh_keys(plan: Plan) -> set[tuple[str, datetime]]:
    if plan.fresh is not None:
        return plan.fresh
    return {(r.device_id, r.ts) for r in plan.readings}


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


def dead_letter(
    delivery: Delivery, reason: RejectReason, detail: str, tenant_id: str | None = None
) -> DeadLetter:
    return DeadLetter(
        topic=safe_text(delivery.topic),
        device_id=delivery.device_id,
        reason=reason,
        detail=safe_text(detail[:1000]),
        payload=payload_excerpt(delivery.payload),
        payload_size=len(delivery.payload),
        received_at=delivery.received_at,
        tenant_id=tenant_id,
    )


def plan_batch(batch: list[Delivery], refused: Mapping[str, Refusal], tenants: Mapping[str, str]) -> Plan:
    """Readings, dead letters and device updates for ``batch``; messages of devices in ``refused`` are
    dead letters with the refusal's reason. ``tenants`` gives each device's tenant (every device with
    something to store is in it), which its dead letters and events belong to.

    A device's status is the last one in the batch (messages are in arrival order); ``last_seen`` is the
    latest receipt time of anything stored for the device, never an offline will message.
    """
    plan = Plan()
    for delivery in batch:
        device_id = delivery.device_id
        refusal = tenant_id = None
        if device_id is not None:
            refusal = refused.get(device_id)
            tenant_id = tenants.get(device_id) or (refusal.tenant_id if refusal is not None else None)
        for reject in delivery.rejects:
            plan.dead_letters.append(dead_letter(delivery, reject.reason, reject.detail, tenant_id))
        if delivery.ack is not None and device_id is not None:
            plan.acks.append((device_id, delivery.ack))
        outcome = delivery.outcome
        if not delivery.needs_device:
            if outcome is not None:
                # Nothing left to store: refused before the plan (its last reject says why, e.g. a
                # tenant_quota refusal appended to the parse rejects), or nothing valid to begin with.
                plan.outcomes.append((outcome, 0, delivery.rejects[-1] if delivery.rejects else None))
            continue
        assert device_id is not None
        if refusal is not None:
            plan.dead_letters.append(dead_letter(delivery, refusal.reason, refusal.detail, tenant_id))
            if outcome is not None:
                plan.outcomes.append((outcome, 0, Reject(refusal.reason, refusal.detail)))
            continue
        if outcome is not None:
            plan.outcomes.append((outcome, len(delivery.readings) + (delivery.report is not None), None))
        plan.tenants[device_id] = tenants[device_id]
        plan.readings.extend(delivery.readings)
        if delivery.redelivered:
            plan.redelivered.update((r.device_id, r.ts) for r in delivery.readings)
        if delivery.report is not None:
            plan.reports.append((device_id, delivery.report, delivery))
        if delivery.status is not None:
            plan.statuses[device_id] = (delivery.status, delivery.received_at)
        if delivery.readings or delivery.report is not None or delivery.status == "online":
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

    The Redis script that guards the latest-values hash derives the same key from the stored value (whose
    year has 4 digits, as here: ``isoformat`` pads it, strftime's ``%Y`` does not).
    """
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    text = ts.isoformat(timespec="microseconds")  # YYYY-MM-DDTHH:MM:SS.ffffff+00:00
    return text[:19] + text[20:26]
