"""Hourly rollup of telemetry, so that a month of 1 Hz data aggregates from ~720 rows, not 2.6 million.

A periodic job in every API replica rolls closed hours into ``telemetry_hourly`` under a PostgreSQL
advisory lock (one replica works, the others skip). The watermark ``telemetry_rollup_state.rolled_until``
says which hours are done; queries read the hourly rows before it and raw rows after it, so answers are
always complete. Guarantees (docs/api.md, "Aggregates and staleness"):

- an hour is rolled up ``lag`` after it closes; until then its aggregates are computed from raw rows;
- each advance also recomputes the ``refresh`` hours before the old watermark, which picks up readings that
  arrived late (devices that buffered while offline) up to that much after their hour was rolled up;
- a reading arriving later than that is stored and visible as a raw point and in sub-hour buckets, but
  not in 1h/1d buckets of an already rolled hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

ROLLUP_LOCK_KEY = 0x10770003
HOUR = timedelta(hours=1)
BATCH = timedelta(hours=24)
"""Hours rolled per transaction, so that catching up never holds one huge transaction."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
log = structlog.stdlib.get_logger("iot_api.rollup")


def floor_to(ts: datetime, step: timedelta) -> datetime:
    return ts - (ts - _EPOCH) % step


def ceil_to(ts: datetime, step: timedelta) -> datetime:
    floor = floor_to(ts, step)
    return floor if floor == ts else floor + step


async def rolled_until(conn: Conn) -> datetime | None:
    value: datetime | None = await conn.fetchval("SELECT rolled_until FROM telemetry_rollup_state")
    return value


async def roll_up(
    conn: Conn,
    *,
    now: datetime | None = None,
    lag: timedelta = timedelta(minutes=2),
    refresh: timedelta = HOUR,
    retention_days: int = 30,
) -> datetime | None:
    """Roll closed hours into ``telemetry_hourly``; return the new watermark, None if another holds the lock.

    Starts from the oldest retained day on the first run. Drops hourly rows past retention. Logs one
    ``telemetry rolled up`` line (info) per call that advanced the watermark, however many day-long
    batches that took (a first run catches up the whole retention); each batch is logged at debug.
    """
    rolled: list[tuple[datetime, datetime]] = []
    try:
        return await _roll_batches(conn, now or datetime.now(UTC), lag, refresh, retention_days, rolled)
    finally:
        if rolled:
            log.info(
                "telemetry rolled up",
                start=rolled[0][0].isoformat(),
                until=rolled[-1][1].isoformat(),
                batches=len(rolled),
            )


async def _roll_batches(
    conn: Conn,
    now: datetime,
    lag: timedelta,
    refresh: timedelta,
    retention_days: int,
    rolled: list[tuple[datetime, datetime]],
) -> datetime | None:
    """The loop of :func:`roll_up`, a transaction per batch; each batch's (start, end) goes to ``rolled``."""
    target = floor_to(now - lag, HOUR)
    while True:
        async with conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", ROLLUP_LOCK_KEY):
                return None
            until = await rolled_until(conn)
            if until is None:
                until = floor_to(now - timedelta(days=retention_days), timedelta(days=1))
                start = until
            else:
                start = until - refresh
            if until >= target:
                await conn.execute(
                    "DELETE FROM telemetry_hourly WHERE bucket < $1", now - timedelta(days=retention_days)
                )
                return until
            end = min(until + BATCH, target)
            await conn.execute(
                """
                INSERT INTO telemetry_hourly AS h (device_id, metric, bucket, count, sum, min, max)
                SELECT device_id, metric, date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                       count(value), sum(value), min(value), max(value)
                FROM telemetry
                WHERE ts >= $1 AND ts < $2 AND value IS NOT NULL
                GROUP BY 1, 2, 3
                ON CONFLICT (device_id, metric, bucket) DO UPDATE
                SET count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max
                """,
                start,
                end,
            )
            await conn.execute(
                """
                INSERT INTO telemetry_rollup_state (id, rolled_until) VALUES (true, $1)
                ON CONFLICT (id) DO UPDATE SET rolled_until = excluded.rolled_until, updated_at = now()
                """,
                end,
            )
        log.debug("telemetry rollup batch", start=start.isoformat(), until=end.isoformat())
        rolled.append((start, end))
        refresh = timedelta(0)


async def run_rollup(
    pool: asyncpg.Pool[Any], *, lag: timedelta, refresh: timedelta, retention_days: int
) -> None:
    """One run of the API service's periodic job (:func:`roll_up` on a connection of ``pool``)."""
    async with pool.acquire() as conn:
        await roll_up(conn, lag=lag, refresh=refresh, retention_days=retention_days)
