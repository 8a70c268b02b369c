"""Writing telemetry rows: one round trip per batch, and a reading delivered twice is stored once.

Readings older than :data:`~iot_common.db.rollups.LATE_AFTER` also mark their minute for the API's rollup
job, in the same statement (only in a batch that has such readings), so that rollups of hours and days
already rolled up are corrected.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from iot_common.db.rollups import LATE_AFTER
from iot_common.messages import Reading

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

_COUNT_INSERTED = """
SELECT count(*) AS n,
       CASE WHEN count(*) < ${total} THEN coalesce(array_agg(device_id), '{{}}') END AS devices,
       CASE WHEN count(*) < ${total} THEN coalesce(array_agg(ts), '{{}}') END AS stamps
FROM inserted
"""
"""The new rows, and only when some rows were there before (a redelivery), which readings they belong to:
the normal batch gets one small row back."""

INSERT_TELEMETRY = """
WITH inserted AS (
    INSERT INTO telemetry (device_id, metric, ts, value, value_text)
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::float8[], $5::text[])
    ON CONFLICT (device_id, metric, ts) DO NOTHING
    RETURNING device_id, ts
)""" + _COUNT_INSERTED.format(total=6)
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
), inserted AS (
    INSERT INTO telemetry (device_id, metric, ts, value, value_text)
    SELECT * FROM batch
    ON CONFLICT (device_id, metric, ts) DO NOTHING
    RETURNING device_id, ts
)""" + _COUNT_INSERTED.format(total=7)
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


class Inserted(NamedTuple):
    new_rows: int
    fresh: set[tuple[str, datetime]] | None
    """(device, ts) of the readings with a new row, when some rows were stored before; None: all new."""


async def insert_telemetry(
    conn: Conn, readings: Iterable[Reading], *, now: datetime | None = None
) -> Inserted:
    """Insert the readings' rows, skipping rows already stored, and mark the minutes of late readings for
    the rollup job; return the number of new rows (and which readings they are, after a redelivery)."""
    batch = readings if isinstance(readings, list) else list(readings)
    columns = telemetry_columns(batch)
    if not columns[0]:
        return Inserted(0, None)
    total = len(columns[0])
    cutoff = (now or datetime.now(UTC)) - LATE_AFTER
    if any(reading.ts < cutoff for reading in batch):
        row = await conn.fetchrow(INSERT_TELEMETRY_MARKING_LATE, *columns, cutoff, total)
    else:
        row = await conn.fetchrow(INSERT_TELEMETRY, *columns, total)
    assert row is not None
    if row["devices"] is None:
        return Inserted(int(row["n"]), None)
    return Inserted(int(row["n"]), set(zip(row["devices"], row["stamps"], strict=True)))
