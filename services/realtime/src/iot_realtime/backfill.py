"""Gap-free resume: the readings stored after a subscribe frame's ``since``, and the seam with live events.

The gateway subscribes to the live channels first (their events are held back), then reads PostgreSQL, sends
what it found, then lets the held and later live events through. No reading falls in between: ingest
publishes a reading's event only after its row is committed, so a reading is either committed before the
query (and found by it) or published after the subscription (and delivered live). A reading can be both
(committed before the query, its event still on the way): :class:`Seam` drops the live copy of each reading
sent from PostgreSQL, for a short while after the backfill, so none arrives twice.

Telemetry readings only: status, alerts, commands and the device's ``state`` come with ``latest`` or live.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import msgspec

from iot_common.messages import MetricValue, TelemetryEvent, decode_event, encode_event

SEAM_WINDOW_S = 30.0
"""How long after a backfill live events are checked against it. A duplicate is a reading committed before
the query whose event had not been published yet: ingest publishes right after its commit, so milliseconds
are the rule and seconds (a stalled ingest) the exception."""

Key = tuple[str, datetime]
"""A reading: (device id, ts)."""

_READINGS = """
WITH r AS (
    SELECT t.device_id, t.ts
    FROM telemetry t JOIN devices d ON d.id = t.device_id AND d.tenant_id = $1::uuid
    WHERE t.ts > $2 AND ($3::text[] IS NULL OR t.device_id = ANY($3::text[]))
      AND ($4::text[] IS NULL OR t.metric = ANY($4::text[]))
    GROUP BY t.device_id, t.ts
    ORDER BY t.ts DESC, t.device_id DESC
    LIMIT $5
)
SELECT t.device_id, t.ts, t.metric, t.value, t.value_text
FROM r JOIN telemetry t ON t.device_id = r.device_id AND t.ts = r.ts
WHERE t.ts > $2 AND ($4::text[] IS NULL OR t.metric = ANY($4::text[]))
ORDER BY t.ts, t.device_id, t.metric
"""


@dataclass(frozen=True)
class Backfill:
    readings: list[TelemetryEvent]
    """Oldest first."""
    truncated: bool
    """More readings were stored after ``since`` than were returned (the oldest were left out)."""


async def stored_readings(
    pool: asyncpg.Pool[asyncpg.Record],
    tenant_id: str,
    devices: Sequence[str] | None,
    since: datetime,
    metrics: Sequence[str] | None,
    limit: int,
) -> Backfill:
    """The readings of ``devices`` of ``tenant_id`` (every device of the tenant for None) stored with a ``ts``
    after ``since``, the most recent ``limit`` of them; limited to ``metrics`` unless None."""
    if limit == 0:
        found = await pool.fetchval(
            "SELECT true FROM telemetry t JOIN devices d ON d.id = t.device_id AND d.tenant_id = $1::uuid "
            "WHERE t.ts > $2 AND ($3::text[] IS NULL OR t.device_id = ANY($3::text[])) "
            "AND ($4::text[] IS NULL OR t.metric = ANY($4::text[])) LIMIT 1",
            tenant_id,
            since,
            None if devices is None else list(devices),
            None if metrics is None else list(metrics),
        )
        return Backfill([], bool(found))
    rows = await pool.fetch(
        _READINGS,
        tenant_id,
        since,
        None if devices is None else list(devices),
        None if metrics is None else list(metrics),
        limit + 1,
    )
    readings: list[TelemetryEvent] = []
    current: tuple[str, datetime] | None = None
    values: dict[str, MetricValue] = {}
    for row in rows:
        key = (row["device_id"], row["ts"])
        if key != current:
            if current is not None:
                readings.append(TelemetryEvent(device_id=current[0], ts=current[1], metrics=values))
            current, values = key, {}
        values[row["metric"]] = row["value"] if row["value"] is not None else row["value_text"]
    if current is not None:
        readings.append(TelemetryEvent(device_id=current[0], ts=current[1], metrics=values))
    truncated = len(readings) > limit
    return Backfill(readings[-limit:] if truncated else readings, truncated)


class Seam:
    """The readings a backfill sent (and their metrics), to drop their live copies for a while."""

    def __init__(
        self, window_s: float = SEAM_WINDOW_S, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._sent: dict[Key, frozenset[str]] = {}
        self._clock = clock
        self._window_s = window_s
        self._until = 0.0

    def add(self, readings: Sequence[TelemetryEvent]) -> None:
        for reading in readings:
            key = (reading.device_id, reading.ts)
            self._sent[key] = self._sent.get(key, frozenset()) | reading.metrics.keys()
        self._until = self._clock() + self._window_s

    @property
    def expired(self) -> bool:
        return self._clock() > self._until

    def admit(self, frame: bytes) -> bytes | None:
        """``frame`` as a client should get it after the backfill: None when it repeats a reading sent (every
        metric of it), the metrics not sent yet when it repeats a part of one, else unchanged."""
        try:
            event = decode_event(frame)
        except msgspec.MsgspecError:
            return frame
        if not isinstance(event, TelemetryEvent):
            return frame
        sent = self._sent.get((event.device_id, event.ts))
        if sent is None:
            return frame
        left = {name: value for name, value in event.metrics.items() if name not in sent}
        if not left:
            return None
        return encode_event(msgspec.structs.replace(event, metrics=left))
