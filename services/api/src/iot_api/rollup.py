"""Rollups of numeric telemetry at three levels: minutes, hours and days.

A year at 1 Hz is 31.5 million raw rows per metric; at daily resolution it is 365 rows of
``telemetry_daily``, kept long after the raw rows are dropped (``IOT_ROLLUP_RETENTION_DAYS_*``).

A periodic job in every API replica does the work under a PostgreSQL advisory lock (one replica works,
the others skip), one transaction per step:

- **roll forward**: closed hours, ``lag`` after they close, a day per transaction: minutes from raw rows
  (``telemetry_minutely``), hours from those minutes (``telemetry_hourly``), and every day that is now
  whole from its hours (``telemetry_daily``). The watermarks ``telemetry_rollup_state.minute_until``,
  ``hour_until`` (equal: minutes are rolled a whole hour at a time, so the raw partitions are read once
  per hour, not once a minute) and ``day_until`` say which buckets are done; queries read rollup rows
  before them and raw rows after them, so answers include data not yet rolled up.
- **late readings**: ingest marks the minute of each reading older than
  :data:`~iot_common.db.rollups.LATE_AFTER` in ``telemetry_rollup_dirty`` (in the batch's transaction);
  the job takes the marks (a bounded chunk per transaction), recomputes each marked minute already rolled
  up from raw rows, its hour from its minutes and its day (if rolled up) from its hours. A mark the job
  deletes was committed with its reading, so the recomputation sees it; a mark touched by a transaction
  still open is skipped until the next run (ingest updates it, and the delete waits for that row
  lock). When the watermark advances, the ``refresh`` hours before it are also recomputed from raw rows:
  a safety net, as in the hourly-only job before.
- **retention**: rows of each level older than its retention are deleted in bounded chunks.

Recomputing a bucket replaces its row, so every step is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg
import structlog

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

ROLLUP_LOCK_KEY = 0x10770003
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
BATCH = timedelta(hours=24)
"""Hours rolled per transaction, so that catching up never holds one huge transaction."""
MARKS_PER_TRANSACTION = 5_000
"""Late minutes taken and recomputed per transaction."""
DELETE_CHUNK = 10_000
"""Rollup rows past retention deleted per transaction."""
MAX_CHUNKS_PER_RUN = 100
"""Transactions per run for late minutes, and for each level's retention: the rest waits for the next run."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
log = structlog.stdlib.get_logger("iot_api.rollup")

LevelName = Literal["minute", "hour", "day"]


@dataclass(frozen=True)
class Level:
    name: LevelName
    width: timedelta
    table: str


LEVELS: Final = (
    Level("minute", MINUTE, "telemetry_minutely"),
    Level("hour", HOUR, "telemetry_hourly"),
    Level("day", DAY, "telemetry_daily"),
)


@dataclass(frozen=True)
class RollupRetention:
    """Days each level keeps its rows (``IOT_ROLLUP_RETENTION_DAYS_{MINUTE,HOUR,DAY}``)."""

    minute_days: int = 30
    hour_days: int = 400
    day_days: int = 3650

    def of(self, level: LevelName) -> timedelta:
        days = {"minute": self.minute_days, "hour": self.hour_days, "day": self.day_days}[level]
        return timedelta(days=days)


@dataclass(frozen=True)
class Watermarks:
    """Per level, the end of what is rolled up (None: never rolled)."""

    minute: datetime | None
    hour: datetime | None
    day: datetime | None

    def of(self, level: LevelName) -> datetime | None:
        value: datetime | None = getattr(self, level)
        return value


def floor_to(ts: datetime, step: timedelta) -> datetime:
    return ts - (ts - _EPOCH) % step


def ceil_to(ts: datetime, step: timedelta) -> datetime:
    floor = floor_to(ts, step)
    return floor if floor == ts else floor + step


async def watermarks(conn: Conn) -> Watermarks:
    row = await conn.fetchrow("SELECT minute_until, hour_until, day_until FROM telemetry_rollup_state")
    if row is None:
        return Watermarks(None, None, None)
    return Watermarks(row["minute_until"], row["hour_until"], row["day_until"])


async def rolled_until(conn: Conn) -> datetime | None:
    """The minute and hour levels' watermark."""
    return (await watermarks(conn)).hour


_ROLL_MINUTES = f"""
INSERT INTO telemetry_minutely (device_id, metric, bucket, count, sum, min, max)
SELECT device_id, metric, date_bin('1 minute', ts, TIMESTAMPTZ '{_EPOCH.isoformat()}'),
       count(value), sum(value), min(value), max(value)
FROM telemetry
WHERE ts >= $1 AND ts < $2 AND value IS NOT NULL
GROUP BY 1, 2, 3
ON CONFLICT (device_id, metric, bucket) DO UPDATE
SET count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max
"""


def _from_finer(table: str, finer: str, width: str) -> str:
    """Rows of ``table`` for [$1, $2) from the rows of the finer level ``finer``."""
    return f"""
    INSERT INTO {table} (device_id, metric, bucket, count, sum, min, max)
    SELECT device_id, metric, date_bin('{width}', bucket, TIMESTAMPTZ '{_EPOCH.isoformat()}'),
           sum(count)::bigint, sum(sum), min(min), max(max)
    FROM {finer}
    WHERE bucket >= $1 AND bucket < $2
    GROUP BY 1, 2, 3
    ON CONFLICT (device_id, metric, bucket) DO UPDATE
    SET count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max
    """


_ROLL_HOURS = _from_finer("telemetry_hourly", "telemetry_minutely", "1 hour")
_ROLL_DAYS = _from_finer("telemetry_daily", "telemetry_hourly", "1 day")

_SET_STATE = """
INSERT INTO telemetry_rollup_state (id, rolled_until, minute_until, hour_until, day_until)
VALUES (true, $1, $1, $1, $2)
ON CONFLICT (id) DO UPDATE SET rolled_until = $1, minute_until = $1, hour_until = $1, day_until = $2,
                               updated_at = now()
"""

_TAKE_MARKS = """
DELETE FROM telemetry_rollup_dirty
WHERE ctid = ANY(ARRAY(SELECT ctid FROM telemetry_rollup_dirty LIMIT $1))
RETURNING device_id, metric, bucket
"""

# Marked buckets of one level recomputed from raw rows: (device, metric, bucket) arrays in $1..$3, the
# level's width in $4. Minutes always; an hour whose minutes are past their retention, a day whose hours are.
_REDO_FROM_RAW = """
INSERT INTO {table} (device_id, metric, bucket, count, sum, min, max)
SELECT m.device_id, m.metric, m.bucket, count(t.value), sum(t.value), min(t.value), max(t.value)
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS m(device_id, metric, bucket)
JOIN telemetry t ON t.device_id = m.device_id AND t.metric = m.metric
                AND t.ts >= m.bucket AND t.ts < m.bucket + $4::interval
WHERE t.value IS NOT NULL
GROUP BY 1, 2, 3
ON CONFLICT (device_id, metric, bucket) DO UPDATE
SET count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max
"""


def _redo_from_finer(table: str, finer: str, width: str) -> str:
    return f"""
    INSERT INTO {table} (device_id, metric, bucket, count, sum, min, max)
    SELECT m.device_id, m.metric, m.bucket, sum(f.count)::bigint, sum(f.sum), min(f.min), max(f.max)
    FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS m(device_id, metric, bucket)
    JOIN {finer} f ON f.device_id = m.device_id AND f.metric = m.metric
                  AND f.bucket >= m.bucket AND f.bucket < m.bucket + interval '{width}'
    GROUP BY 1, 2, 3
    ON CONFLICT (device_id, metric, bucket) DO UPDATE
    SET count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max
    """


_REDO_HOURS = _redo_from_finer("telemetry_hourly", "telemetry_minutely", "1 hour")
_REDO_DAYS = _redo_from_finer("telemetry_daily", "telemetry_hourly", "1 day")


async def _locked(conn: Conn) -> bool:
    locked: bool = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", ROLLUP_LOCK_KEY)
    return locked


async def roll_up(
    conn: Conn,
    *,
    now: datetime | None = None,
    lag: timedelta = timedelta(minutes=2),
    refresh: timedelta = HOUR,
    retention_days: int = 30,
    retention: RollupRetention | None = None,
) -> datetime | None:
    """Roll closed hours up at every level, recompute the minutes marked late, apply each level's
    retention; return the minute and hour levels' watermark, None if another replica holds the lock.

    ``retention_days`` is raw telemetry's: a first run starts at the oldest retained day. Logs one
    ``telemetry rolled up`` line (info) per call that advanced the watermark, however many day-long
    batches that took (a first run catches up the whole raw retention); each batch is logged at debug.
    """
    now = now or datetime.now(UTC)
    rolled: list[tuple[datetime, datetime]] = []
    try:
        until = await _roll_forward(conn, now, lag, refresh, retention_days, rolled)
    finally:
        if rolled:
            log.info(
                "telemetry rolled up",
                start=rolled[0][0].isoformat(),
                until=rolled[-1][1].isoformat(),
                batches=len(rolled),
            )
    retention = retention or RollupRetention()
    if (
        until is None
        or not await _redo_late(conn, now, retention)
        or not await _apply_retention(conn, now, retention)
    ):
        return None
    return until


async def _roll_forward(
    conn: Conn,
    now: datetime,
    lag: timedelta,
    refresh: timedelta,
    retention_days: int,
    rolled: list[tuple[datetime, datetime]],
) -> datetime | None:
    """A transaction per batch of closed hours; each batch's (start, end) goes to ``rolled``."""
    target = floor_to(now - lag, HOUR)
    while True:
        async with conn.transaction():
            if not await _locked(conn):
                return None
            marks = await watermarks(conn)
            until = marks.minute
            if until is None:
                until = floor_to(now - timedelta(days=retention_days), DAY)
                start = until
            else:
                start = until - refresh
            if until >= target:
                return until
            end = min(until + BATCH, target)
            await conn.execute(_ROLL_MINUTES, start, end)
            await conn.execute(_ROLL_HOURS, start, end)
            # Days now whole, and the days the refreshed hours belong to.
            day_start = floor_to(start, DAY)
            if marks.day is not None:
                day_start = min(day_start, marks.day)
            day_end = floor_to(end, DAY)
            if day_start < day_end:
                await conn.execute(_ROLL_DAYS, day_start, day_end)
            await conn.execute(_SET_STATE, end, max(day_end, marks.day or day_end))
        log.debug("telemetry rollup batch", start=start.isoformat(), until=end.isoformat())
        rolled.append((start, end))
        refresh = timedelta(0)


def _columns(keys: set[tuple[str, str, datetime]]) -> tuple[list[str], list[str], list[datetime]]:
    ordered = sorted(keys)
    return [k[0] for k in ordered], [k[1] for k in ordered], [k[2] for k in ordered]


async def _redo_late(conn: Conn, now: datetime, retention: RollupRetention) -> bool:
    """Recompute the minutes marked late (and their hours and days), a chunk of marks per transaction;
    False if another replica holds the lock.

    An hour starting before the minutes' retention is recomputed from raw rows rather than from its
    minutes (some may be deleted already), and so is a day starting before the hours' retention: a raw
    partition holds a whole day, so a day that still has a late reading has all its raw rows."""
    minutes_from = now - retention.of("minute")
    hours_from = now - retention.of("hour")
    redone = 0
    for _ in range(MAX_CHUNKS_PER_RUN):
        async with conn.transaction():
            if not await _locked(conn):
                return False
            taken = await conn.fetch(_TAKE_MARKS, MARKS_PER_TRANSACTION)
            if not taken:
                break
            marks = await watermarks(conn)
            rolled = marks.minute or _EPOCH
            # Marks at or after the watermark: the roll forward will read their readings (committed).
            minutes = {(r["device_id"], r["metric"], r["bucket"]) for r in taken if r["bucket"] < rolled}
            if minutes:
                hours = {(d, m, floor_to(b, HOUR)) for d, m, b in minutes}
                day_until = marks.day or _EPOCH
                days = {(d, m, floor_to(b, DAY)) for d, m, b in minutes if floor_to(b, DAY) < day_until}
                await _redo(conn, "telemetry_minutely", MINUTE, minutes, None)
                await _redo(conn, "telemetry_hourly", HOUR, hours, (minutes_from, _REDO_HOURS))
                await _redo(conn, "telemetry_daily", DAY, days, (hours_from, _REDO_DAYS))
                redone += len(minutes)
        if len(taken) < MARKS_PER_TRANSACTION:
            break
    if redone:
        log.info("late readings rolled up", minutes=redone)
    return True


async def _redo(
    conn: Conn,
    table: str,
    width: timedelta,
    keys: set[tuple[str, str, datetime]],
    finer: tuple[datetime, str] | None,
) -> None:
    """Recompute ``keys`` of ``table``: from the finer level (``finer``: where it starts to be whole, and
    the statement) when it is whole for the bucket, else from raw rows."""
    from_raw = keys if finer is None else {k for k in keys if k[2] < finer[0]}
    if from_raw:
        await conn.execute(_REDO_FROM_RAW.format(table=table), *_columns(from_raw), width)
    if finer is not None and len(from_raw) < len(keys):
        await conn.execute(finer[1], *_columns(keys - from_raw))


async def _apply_retention(conn: Conn, now: datetime, retention: RollupRetention) -> bool:
    """Delete each level's rows past its retention, in chunks; False if another replica holds the lock."""
    for level in LEVELS:
        cutoff = now - retention.of(level.name)
        deleted = 0
        for _ in range(MAX_CHUNKS_PER_RUN):
            async with conn.transaction():
                if not await _locked(conn):
                    return False
                status = await conn.execute(
                    f"""
                    DELETE FROM {level.table} WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM {level.table} WHERE bucket < $1 LIMIT $2
                    ))
                    """,
                    cutoff,
                    DELETE_CHUNK,
                )
            count = int(status.rsplit(" ", 1)[1])
            deleted += count
            if count < DELETE_CHUNK:
                break
        if deleted:
            log.info("telemetry rollup past retention deleted", level=level.name, rows=deleted)
    return True


async def run_rollup(
    pool: asyncpg.Pool[Any],
    *,
    lag: timedelta,
    refresh: timedelta,
    retention_days: int,
    retention: RollupRetention | None = None,
) -> None:
    """One run of the API service's periodic job (:func:`roll_up` on a connection of ``pool``)."""
    async with pool.acquire() as conn:
        await roll_up(conn, lag=lag, refresh=refresh, retention_days=retention_days, retention=retention)
