"""The hourly rollup: watermark, one worker at a time, late readings within the refresh window."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from structlog.testing import capture_logs

from iot_api.rollup import ROLLUP_LOCK_KEY, floor_to, roll_up, rolled_until
from iot_common.db import connect
from iot_common.messages import Reading
from iot_ingest.telemetry import insert_telemetry

NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
HOUR = NOW.replace(minute=0) - timedelta(hours=3)


async def hourly(conn: asyncpg.Connection[Any], device_id: str) -> list[tuple[datetime, int, float]]:
    rows = await conn.fetch(
        "SELECT bucket, count, sum FROM telemetry_hourly WHERE device_id = $1 ORDER BY bucket", device_id
    )
    return [(r["bucket"], r["count"], r["sum"]) for r in rows]


async def test_rollup_watermark_lock_and_late_data(database_url: str, unique: str) -> None:
    device_id = f"r-{unique}"
    conn = await connect(database_url)
    other = await connect(database_url)
    try:
        readings = [
            Reading(device_id, HOUR + timedelta(minutes=m), {"v": 1.0, "s": "text is not rolled up"})
            for m in range(0, 180, 10)
        ]
        await insert_telemetry(conn, readings)

        # Another replica holds the lock: this one skips.
        async with other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK_KEY)
            assert await roll_up(conn, now=NOW, lag=timedelta(minutes=2)) is None
        until = await roll_up(conn, now=NOW, lag=timedelta(minutes=2))
        assert until == NOW.replace(minute=0)
        assert await rolled_until(conn) == until
        assert await hourly(conn, device_id) == [(HOUR + timedelta(hours=h), 6, 6.0) for h in range(3)]

        # Nothing new closed: a second run changes nothing.
        assert await roll_up(conn, now=NOW + timedelta(minutes=5), lag=timedelta(minutes=2)) == until

        # A late reading for the last rolled hour is picked up when the next hour closes (refresh = 1 h) ...
        await insert_telemetry(conn, [Reading(device_id, HOUR + timedelta(hours=2, minutes=55), {"v": 4.0})])
        later = NOW + timedelta(hours=1)
        assert await roll_up(conn, now=later, lag=timedelta(minutes=2)) == later.replace(minute=0)
        assert (await hourly(conn, device_id))[2] == (HOUR + timedelta(hours=2), 7, 10.0)

        # ... but one older than the refresh window stays out of the rollup (documented).
        await insert_telemetry(conn, [Reading(device_id, HOUR + timedelta(minutes=5), {"v": 100.0})])
        await roll_up(conn, now=later + timedelta(hours=1), lag=timedelta(minutes=2))
        assert (await hourly(conn, device_id))[0] == (HOUR, 6, 6.0)
    finally:
        await other.close()
        await conn.close()


async def test_a_first_run_catching_up_the_whole_retention_logs_one_line(
    database_url: str, unique: str
) -> None:
    conn = await connect(database_url)
    try:
        await insert_telemetry(conn, [Reading(f"r-{unique}", HOUR, {"v": 2.0})])
        with capture_logs() as logs:
            until = await roll_up(conn, now=NOW, lag=timedelta(minutes=2), retention_days=30)
            assert await roll_up(conn, now=NOW, lag=timedelta(minutes=2), retention_days=30) == until
        rolled = [entry for entry in logs if entry["event"] == "telemetry rolled up"]
        assert len(rolled) == 1, logs
        assert rolled[0]["log_level"] == "info"
        assert rolled[0]["until"] == NOW.replace(minute=0).isoformat()
        # A day per transaction, from the oldest retained day to the last closed hour.
        first_day = floor_to(NOW - timedelta(days=30), timedelta(days=1))
        assert rolled[0]["batches"] == math.ceil((NOW.replace(minute=0) - first_day) / timedelta(days=1))
        assert rolled[0]["start"] == first_day.isoformat()
        assert await hourly(conn, f"r-{unique}") == [(HOUR, 1, 2.0)]
    finally:
        await conn.close()
