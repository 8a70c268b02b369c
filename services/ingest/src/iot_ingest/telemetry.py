"""Writing telemetry rows: one round trip per batch, and a reading delivered twice is stored once.

Readings older than :data:`~iot_common.db.rollups.LATE_AFTER` also mark their minute for the API's rollup
job (one more statement, only in a batch that has such readings), so that rollups of hours and days
already rolled up are corrected.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from iot_common.db.rollups import LATE_AFTER, MARK_LATE
from iot_common.messages import Reading

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

INSERT_TELEMETRY = """
INSERT INTO telemetry (device_id, metric, ts, value, value_text)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::float8[], $5::text[])
ON CONFLICT (device_id, metric, ts) DO NOTHING
"""


def telemetry_columns(
    readings: Iterable[Reading],
) -> tuple[list[str], list[str], list[datetime], list[float | None], list[str | None]]:
    """Column arrays for :data:`INSERT_TELEMETRY`: one row per metric of each reading."""
    devices: list[str] = []
    metrics: list[str] = []
    stamps: list[datetime] = []
    values: list[float | None] = []
    texts: list[str | None] = []
    for reading in readings:
        for metric, value in reading.metrics.items():
            devices.append(reading.device_id)
            metrics.append(metric)
            stamps.append(reading.ts)
            if isinstance(value, str):
                values.append(None)
                texts.append(value)
            else:
                values.append(float(value))
                texts.append(None)
    return devices, metrics, stamps, values, texts


def late_minutes(
    readings: Iterable[Reading], now: datetime
) -> tuple[list[str], list[str], list[datetime]] | None:
    """Column arrays for :data:`~iot_common.db.rollups.MARK_LATE`: each (device, metric, minute) of the
    numeric values of readings older than ``now - LATE_AFTER``, once, sorted (concurrent replicas lock
    marks in the same order); None when there are none (the usual case: one comparison per reading)."""
    cutoff = now - LATE_AFTER
    marks: set[tuple[str, str, datetime]] = set()
    for reading in readings:
        if reading.ts >= cutoff:
            continue
        minute = reading.ts.replace(second=0, microsecond=0)
        for metric, value in reading.metrics.items():
            if not isinstance(value, str):
                marks.add((reading.device_id, metric, minute))
    if not marks:
        return None
    ordered = sorted(marks)
    return [m[0] for m in ordered], [m[1] for m in ordered], [m[2] for m in ordered]


async def insert_telemetry(conn: Conn, readings: Iterable[Reading], *, now: datetime | None = None) -> int:
    """Insert the readings' rows, skipping rows already stored, and mark the minutes of late readings for
    the rollup job; return the number of new rows."""
    batch = readings if isinstance(readings, list) else list(readings)
    columns = telemetry_columns(batch)
    if not columns[0]:
        return 0
    status = await conn.execute(INSERT_TELEMETRY, *columns)
    late = late_minutes(batch, now or datetime.now(UTC))
    if late is not None:
        await conn.execute(MARK_LATE, *late)
    return int(status.rsplit(" ", 1)[1])
