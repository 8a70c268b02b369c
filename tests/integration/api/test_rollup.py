"""The rollup job: minute, hour and day levels against raw rows, one worker at a time, late readings,
retention per level."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from structlog.testing import capture_logs

from iot_api.rollup import (
    DAY,
    LEVELS,
    ROLLUP_LOCK_KEY,
    RollupRetention,
    floor_to,
    roll_up,
    rolled_until,
    watermarks,
)
from iot_common.db import connect
from iot_common.messages import Reading
from iot_ingest.telemetry import insert_telemetry
from iot_testkit.waiting import wait_for

# Yesterday 14:30, so that "today" of the job has whole closed hours, and every reading here is late.
TODAY = floor_to(datetime.now(UTC), DAY) - DAY
NOW = TODAY + timedelta(hours=14, minutes=30)
HOUR = NOW.replace(minute=0) - timedelta(hours=3)
LAG = timedelta(minutes=2)

Row = tuple[datetime, int, float, float, float]


async def hourly(conn: asyncpg.Connection[Any], device_id: str) -> list[tuple[datetime, int, float]]:
    rows = await conn.fetch(
        "SELECT bucket, count, sum FROM telemetry_hourly WHERE device_id = $1 ORDER BY bucket", device_id
    )
    return [(r["bucket"], r["count"], r["sum"]) for r in rows]


async def level_rows(conn: asyncpg.Connection[Any], table: str, device_id: str, until: datetime) -> list[Row]:
    rows = await conn.fetch(
        f"SELECT bucket, count, sum, min, max FROM {table} WHERE device_id = $1 AND metric = 'v'"
        " AND bucket < $2 ORDER BY bucket",
        device_id,
        until,
    )
    return [(r["bucket"], r["count"], r["sum"], r["min"], r["max"]) for r in rows]


async def raw_rows(
    conn: asyncpg.Connection[Any], width: timedelta, device_id: str, until: datetime
) -> list[Row]:
    rows = await conn.fetch(
        """
        SELECT date_bin($2, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS b,
               count(value) AS count, sum(value) AS sum, min(value) AS min, max(value) AS max
        FROM telemetry WHERE device_id = $1 AND metric = 'v' AND value IS NOT NULL AND ts < $3
        GROUP BY b ORDER BY b
        """,
        device_id,
        width,
        until,
    )
    return [(r["b"], r["count"], r["sum"], r["min"], r["max"]) for r in rows]


async def assert_levels_match_raw(conn: asyncpg.Connection[Any], device_id: str) -> None:
    """Every rolled-up bucket of every level holds exactly the raw aggregate of its readings."""
    marks = await watermarks(conn)
    for level in LEVELS:
        until = marks.of(level.name)
        assert until is not None, level
        expected = await raw_rows(conn, level.width, device_id, until)
        assert expected, level
        assert await level_rows(conn, level.table, device_id, until) == expected, level.name


async def test_levels_match_raw_one_worker_at_a_time_and_late_readings_correct_them(
    database_url: str, unique: str
) -> None:
    device_id = f"r-{unique}"
    conn = await connect(database_url)
    other = await connect(database_url)
    try:
        # Yesterday and today until NOW, every 7 minutes: v = i, and a text metric that is not rolled up.
        start = TODAY - DAY
        readings = [
            Reading(device_id, start + timedelta(minutes=7 * i), {"v": float(i), "s": "not rolled up"})
            for i in range(int((NOW - start) / timedelta(minutes=7)))
        ]
        await insert_telemetry(conn, readings)

        # Another replica holds the lock: this one skips.
        async with other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK_KEY)
            assert await roll_up(conn, now=NOW, lag=LAG, retention_days=2) is None
        until = await roll_up(conn, now=NOW, lag=LAG, retention_days=2)
        assert until == NOW.replace(minute=0)
        assert await rolled_until(conn) == until
        marks = await watermarks(conn)
        assert (marks.minute, marks.hour, marks.day) == (until, until, TODAY)
        await assert_levels_match_raw(conn, device_id)
        assert await conn.fetchval("SELECT count(*) FROM telemetry_rollup_dirty") == 0

        # Nothing new closed: a second run changes nothing.
        assert await roll_up(conn, now=NOW + timedelta(minutes=5), lag=LAG, retention_days=2) == until

        # Late readings: in a minute of yesterday (a rolled-up day), in a minute of today's first hour,
        # in a minute that had no reading; a late text value changes nothing and marks nothing.
        late = [
            Reading(device_id, start + timedelta(hours=5, minutes=14, seconds=30), {"v": 1000.0}),
            Reading(device_id, TODAY + timedelta(minutes=1, seconds=1), {"v": -5.0}),
            Reading(device_id, TODAY + timedelta(minutes=2), {"v": 7.0, "s": "late text"}),
        ]
        before_day = await level_rows(conn, "telemetry_daily", device_id, TODAY)
        await insert_telemetry(conn, late)
        # One mark per minute of a late numeric value; the first reading's minute was marked by the first
        # insert (every reading here is late) and taken by the job since.
        marks = await conn.fetch(
            "SELECT device_id, metric, bucket FROM telemetry_rollup_dirty ORDER BY bucket"
        )
        assert [tuple(r) for r in marks] == [
            (device_id, "v", start + timedelta(hours=5, minutes=14)),
            (device_id, "v", TODAY + timedelta(minutes=1)),
            (device_id, "v", TODAY + timedelta(minutes=2)),
        ]
        assert await roll_up(conn, now=NOW + timedelta(minutes=6), lag=LAG, retention_days=2) == until
        await assert_levels_match_raw(conn, device_id)
        assert await conn.fetchval("SELECT count(*) FROM telemetry_rollup_dirty") == 0
        after_day = await level_rows(conn, "telemetry_daily", device_id, TODAY)
        assert after_day[0][1:3] == (before_day[0][1] + 1, before_day[0][2] + 1000.0)
        assert after_day[0][4] == 1000.0  # the day's max
        minute = await conn.fetchrow(
            "SELECT count, min FROM telemetry_minutely WHERE device_id = $1 AND bucket = $2",
            device_id,
            TODAY + timedelta(minutes=1),
        )
        assert minute is not None
        assert (minute["count"], minute["min"]) == (1, -5.0)
    finally:
        await other.close()
        await conn.close()


async def test_a_mark_touched_by_an_open_transaction_waits_for_it(database_url: str, unique: str) -> None:
    """The job never recomputes a minute without a late reading whose transaction touched its mark: the
    mark's delete waits for that transaction, then leaves the mark for the next run."""
    device_id = f"w-{unique}"
    minute = HOUR + timedelta(minutes=10)
    conn = await connect(database_url)
    ingest = await connect(database_url)
    try:
        await insert_telemetry(conn, [Reading(device_id, minute, {"v": 1.0})])
        assert await roll_up(conn, now=NOW, lag=LAG, retention_days=2) == NOW.replace(minute=0)
        await insert_telemetry(conn, [Reading(device_id, minute + timedelta(seconds=1), {"v": 2.0})])
        # Committed mark for the minute; now a second late reading in an open transaction touches it.
        transaction = ingest.transaction()
        await transaction.start()
        await insert_telemetry(ingest, [Reading(device_id, minute + timedelta(seconds=2), {"v": 4.0})])
        job = asyncio.create_task(roll_up(conn, now=NOW, lag=LAG, retention_days=2))

        async def job_waits_on_a_lock() -> bool:
            waiting: int = await ingest.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            return waiting == 1

        await wait_for(job_waits_on_a_lock, 10, "the job waiting for the open transaction")
        await transaction.commit()
        await job
        await roll_up(conn, now=NOW, lag=LAG, retention_days=2)
        row = await conn.fetchrow(
            "SELECT count, sum FROM telemetry_minutely WHERE device_id = $1 AND bucket = $2",
            device_id,
            minute,
        )
        assert row is not None
        assert (row["count"], row["sum"]) == (3, 7.0)
        assert await hourly(conn, device_id) == [(HOUR, 3, 7.0)]
    finally:
        await ingest.close()
        await conn.close()


async def test_each_level_keeps_its_rows_for_its_own_retention(database_url: str, unique: str) -> None:
    device_id = f"k-{unique}"
    retention = RollupRetention(minute_days=2, hour_days=5, day_days=9)
    conn = await connect(database_url)
    try:
        inserted = {}
        for level in LEVELS:
            inserted[level.name] = {floor_to(NOW - timedelta(days=d), level.width) for d in range(1, 12)}
            await conn.executemany(
                f"INSERT INTO {level.table} (device_id, metric, bucket, count, sum, min, max)"
                " VALUES ($1, 'v', $2, 1, 1, 1, 1)",
                [(device_id, bucket) for bucket in inserted[level.name]],
            )
        with capture_logs() as logs:
            await roll_up(conn, now=NOW, lag=LAG, retention_days=1, retention=retention)
        deleted = {}
        for level in LEVELS:
            cutoff = NOW - retention.of(level.name)
            kept = await conn.fetch(f"SELECT bucket FROM {level.table} WHERE device_id = $1", device_id)
            assert {r["bucket"] for r in kept} == {b for b in inserted[level.name] if b >= cutoff}, level
            deleted[level.name] = len([b for b in inserted[level.name] if b < cutoff])
        assert deleted == {"minute": 9, "hour": 7, "day": 3}
        logged = {
            e["level"]: e["rows"] for e in logs if e["event"] == "telemetry rollup past retention deleted"
        }
        assert logged == deleted
    finally:
        await conn.close()


async def test_a_first_run_catching_up_the_whole_retention_logs_one_line(
    database_url: str, unique: str
) -> None:
    conn = await connect(database_url)
    try:
        await insert_telemetry(conn, [Reading(f"r-{unique}", HOUR, {"v": 2.0})])
        with capture_logs() as logs:
            until = await roll_up(conn, now=NOW, lag=LAG, retention_days=30)
            assert await roll_up(conn, now=NOW, lag=LAG, retention_days=30) == until
        rolled = [entry for entry in logs if entry["event"] == "telemetry rolled up"]
        assert len(rolled) == 1, logs
        assert rolled[0]["log_level"] == "info"
        assert rolled[0]["until"] == NOW.replace(minute=0).isoformat()
        # A day per transaction, from the oldest retained day to the last closed hour.
        first_day = floor_to(NOW - timedelta(days=30), DAY)
        assert rolled[0]["batches"] == math.ceil((NOW.replace(minute=0) - first_day) / DAY)
        assert rolled[0]["start"] == first_day.isoformat()
        assert await hourly(conn, f"r-{unique}") == [(HOUR, 1, 2.0)]
    finally:
        await conn.close()


async def test_a_late_reading_past_the_finer_levels_retention_recomputes_from_raw_rows(
    database_url: str, unique: str
) -> None:
    """Minutes kept 2 days and hours 3: a late reading 4 days back (its raw partition is kept) must not
    recompute its hour from minutes already deleted, nor its day from deleted hours."""
    device_id = f"o-{unique}"
    retention = RollupRetention(minute_days=2, hour_days=3, day_days=3650)
    hour = floor_to(NOW - timedelta(days=4), timedelta(hours=1))
    day = floor_to(hour, DAY)
    conn = await connect(database_url)
    try:
        await insert_telemetry(
            conn, [Reading(device_id, hour + timedelta(minutes=m), {"v": 1.0}) for m in range(6)]
        )
        await roll_up(conn, now=NOW, lag=LAG, retention_days=6, retention=retention)
        assert (
            await conn.fetchval("SELECT count(*) FROM telemetry_minutely WHERE device_id = $1", device_id)
            == 0
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM telemetry_hourly WHERE device_id = $1", device_id) == 0
        )
        await insert_telemetry(conn, [Reading(device_id, hour + timedelta(minutes=30), {"v": 3.0})])
        await roll_up(conn, now=NOW, lag=LAG, retention_days=6, retention=retention)
        daily = await conn.fetchrow(
            "SELECT count, sum FROM telemetry_daily WHERE device_id = $1 AND bucket = $2", device_id, day
        )
        assert daily is not None
        assert (daily["count"], daily["sum"]) == (7, 9.0)
    finally:
        await conn.close()
