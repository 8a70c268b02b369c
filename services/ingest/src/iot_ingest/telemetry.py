"""Writing telemetry rows: one round trip per batch, and a reading delivered twice is stored once.

Readings older than :data:`~iot_common.db.rollups.LATE_AFTER` also mark their minute for the API's rollup
job, in the same statement (only in a batch that has such readings), so that rollups of hours and days
already rolled up are corrected.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from iot_common.db.rollups import LATE_AFTER
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
INSERT_TELEMETRY_MARKING_LATE = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::float8[], $5::text[])
        AS u(device_id, metric, ts, value, value_text)
), marked AS (
    INSERT INTO telemetry_rollup_dirty (device_id, metric, bucket)
    SELECT DISTINCT device_id, metric, date_bin('1 minute', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00')
    FROM batch WHERE value IS NOT NULL AND ts < $6
    ORDER BY 1, 2, 3
    ON CONFLICT (device_id, metric, bucket) DO UPDATE SET marked_at = now()
)
INSERT INTO telemetry (device_id, metric, ts, value, value_text)
SELECT * FROM batch
ON CONFLICT (device_id, metric, ts) DO NOTHING
"""
""":data:`INSERT_TELEMETRY` for a batch with late readings (``$6``: the cutoff), in the same statement:
their minutes are marked in ``telemetry_rollup_dirty`` (each once, in key order: concurrent replicas lock
marks in the same order). ``DO UPDATE`` rather than ``DO NOTHING``: the row lock makes the rollup job's
delete of a mark wait for the transaction that touched it, so the job's recomputation sees the reading."""


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


async def insert_telemetry(conn: Conn, readings: Iterable[Reading], *, now: datetime | None = None) -> int:
    """Insert the readings' rows, skipping rows already stored, and mark the minutes of late readings for
    the rollup job; return the number of new rows."""
    batch = readings if isinstance(readings, list) else list(readings)
    columns = telemetry_columns(batch)
    if not columns[0]:
        return 0
    cutoff = (now or datetime.now(UTC)) - LATE_AFTER
    if any(reading.ts < cutoff for reading in batch):
        status = await conn.execute(INSERT_TELEMETRY_MARKING_LATE, *columns, cutoff)
    else:
        status = await conn.execute(INSERT_TELEMETRY, *columns)
    return int(status.rsplit(" ", 1)[1])
