"""Writing telemetry rows: one round trip per batch, and a reading delivered twice is stored once."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

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


async def insert_telemetry(conn: Conn, readings: Iterable[Reading]) -> int:
    """Insert the readings' rows, skipping rows already stored; return the number of new rows."""
    columns = telemetry_columns(readings)
    if not columns[0]:
        return 0
    status = await conn.execute(INSERT_TELEMETRY, *columns)
    return int(status.rsplit(" ", 1)[1])
