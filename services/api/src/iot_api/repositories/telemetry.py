"""Telemetry reads: raw points, bucketed aggregates (over the rollups where they serve), latest values.

Every query names ``device_id`` and ``metric``, so it walks the primary key ``(device_id, metric, ts)``
of each daily partition the time range touches and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from iot_api.repositories.sql import Query
from iot_api.rollup import LEVELS, Level, RollupRetention, Watermarks, ceil_to, floor_to, watermarks

# Distinct metrics of one device, one index probe per metric (a loose index scan), never a full scan.
_METRICS_CTE = """
WITH RECURSIVE m AS (
    SELECT (SELECT metric FROM telemetry WHERE device_id = $1 ORDER BY metric LIMIT 1) AS metric
    UNION ALL
    SELECT (SELECT metric FROM telemetry WHERE device_id = $1 AND metric > m.metric ORDER BY metric LIMIT 1)
    FROM m WHERE m.metric IS NOT NULL
)
"""

_LATEST = (
    _METRICS_CTE
    + """
SELECT l.metric, l.ts, l.value, l.value_text FROM m
CROSS JOIN LATERAL (
    SELECT metric, ts, value, value_text FROM telemetry
    WHERE device_id = $1 AND metric = m.metric ORDER BY ts DESC LIMIT 1
) l
WHERE m.metric IS NOT NULL
"""
)

_ORIGIN = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"

_RAW_AGGREGATE = f"""
SELECT date_bin($3::interval, ts, {_ORIGIN}) AS b,
       count(value) AS count, sum(value) AS sum, min(value) AS min, max(value) AS max
FROM telemetry
WHERE device_id = $1 AND metric = $2 AND ts >= {{start}} AND ts < {{end}} AND value IS NOT NULL
GROUP BY b
"""


@dataclass(frozen=True)
class Segment:
    """A part [start, end) of an aggregate's range and where it is read from (None: raw rows)."""

    level: Level | None
    start: datetime
    end: datetime


def plan_segments(
    start: datetime,
    end: datetime,
    bucket: timedelta,
    marks: Watermarks,
    retention: RollupRetention,
    now: datetime,
) -> list[Segment]:
    """Split [start, end) over the rollup levels, coarsest first: a level whose width divides ``bucket``
    serves the whole buckets of it that are rolled up (before its watermark) and still kept (its
    retention); the edges left over go to the next finer level, and at last to raw rows. So a year of
    ``1d`` buckets reads ~365 daily rows, the current day's closed hours from the hourly rows and only the
    open hour from raw rows."""
    usable = [level for level in reversed(LEVELS) if bucket % level.width == timedelta(0)]

    def split(lo: datetime, hi: datetime, levels: list[Level]) -> list[Segment]:
        if lo >= hi:
            return []
        if not levels:
            return [Segment(None, lo, hi)]
        level, finer = levels[0], levels[1:]
        until = marks.of(level.name)
        if until is None:
            return split(lo, hi, finer)
        first = ceil_to(max(lo, now - retention.of(level.name)), level.width)
        last = min(floor_to(hi, level.width), until)
        if first >= last:
            return split(lo, hi, finer)
        return [*split(lo, first, finer), Segment(level, first, last), *split(last, hi, finer)]

    return split(start, end, usable)


def _segments_query(query: Query, segments: list[Segment]) -> str:
    """count/sum/min/max per bucket (``$3``) of device ``$1``, metric ``$2`` over ``segments``."""
    parts = []
    for segment in segments:
        lo, hi = query.arg(segment.start), query.arg(segment.end)
        if segment.level is None:
            parts.append(
                f"""SELECT date_bin($3::interval, ts, {_ORIGIN}) AS b,
                       value AS sum, value AS min, value AS max, 1::bigint AS count
                FROM telemetry
                WHERE device_id = $1 AND metric = $2 AND value IS NOT NULL AND ts >= {lo} AND ts < {hi}"""
            )
        else:
            parts.append(
                f"""SELECT date_bin($3::interval, bucket, {_ORIGIN}) AS b, sum, min, max, count
                FROM {segment.level.table}
                WHERE device_id = $1 AND metric = $2 AND bucket >= {lo} AND bucket < {hi}"""
            )
    return (
        "WITH parts AS (" + "\nUNION ALL\n".join(parts) + ")\n"
        "SELECT b, sum(count)::bigint AS count, sum(sum) AS sum, min(min) AS min, max(max) AS max\n"
        "FROM parts GROUP BY b"
    )


@dataclass(frozen=True)
class RawRow:
    ts: datetime
    metric: str
    value: float | str


@dataclass(frozen=True)
class Bucket:
    ts: datetime
    count: int
    sum: float
    min: float
    max: float


def _value(row: asyncpg.Record) -> float | str:
    value: float | str = row["value"] if row["value"] is not None else row["value_text"]
    return value


class TelemetryRepository:
    def __init__(self, pool: asyncpg.Pool[Any], retention: RollupRetention | None = None) -> None:
        self.pool = pool
        self.retention = retention or RollupRetention()

    async def metrics(self, device_id: str) -> list[str]:
        rows = await self.pool.fetch(
            _METRICS_CTE + "SELECT metric FROM m WHERE metric IS NOT NULL", device_id
        )
        return [r["metric"] for r in rows]

    async def raw(
        self,
        device_id: str,
        metrics: list[str],
        start: datetime | None,
        end: datetime | None,
        *,
        descending: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[RawRow]:
        """Points of ``metrics`` ordered by (ts, metric), after the position ``after``; ``limit`` at most.

        One index range scan per metric (each stops after ``limit`` rows), merged and cut to ``limit``.
        """
        cmp, order = ("<", "DESC") if descending else (">", "ASC")
        args: list[Any] = [device_id, metrics, limit]
        clauses = ["device_id = $1", "metric = m.metric"]
        if start is not None:
            args.append(start)
            clauses.append(f"ts >= ${len(args)}")
        if end is not None:
            args.append(end)
            clauses.append(f"ts < ${len(args)}")
        if after is not None:
            args.extend(after)
            ts_arg, metric_arg = f"${len(args) - 1}", f"${len(args)}"
            clauses.append(f"ts {cmp}= {ts_arg} AND (ts {cmp} {ts_arg} OR metric {cmp} {metric_arg})")
        rows = await self.pool.fetch(
            f"""
            SELECT t.ts, t.metric, t.value, t.value_text FROM unnest($2::text[]) AS m(metric)
            CROSS JOIN LATERAL (
                SELECT ts, metric, value, value_text FROM telemetry
                WHERE {" AND ".join(clauses)} ORDER BY ts {order} LIMIT $3
            ) t
            ORDER BY t.ts {order}, t.metric {order} LIMIT $3
            """,
            *args,
        )
        return [RawRow(r["ts"], r["metric"], _value(r)) for r in rows]

    async def aggregate(
        self,
        device_id: str,
        metric: str,
        start: datetime,
        end: datetime,
        bucket: timedelta,
        limit: int | None = None,
    ) -> list[Bucket]:
        """count/sum/min/max of numeric values per bucket (aligned on the Unix epoch), oldest first;
        the first ``limit`` buckets when given.

        Each part of the range is read from the coarsest rollup level that serves it (see
        :func:`plan_segments`), the rest (not rolled up yet, or past every level's retention) from raw
        rows.
        """
        async with self.pool.acquire() as conn:
            marks = await watermarks(conn)
            segments = plan_segments(start, end, bucket, marks, self.retention, datetime.now(UTC))
            query = Query(device_id, metric, bucket)
            if len(segments) == 1 and segments[0].level is None:
                sql = _RAW_AGGREGATE.format(start=query.arg(start), end=query.arg(end))
            else:
                sql = _segments_query(query, segments)
            sql += " ORDER BY b"
            if limit is not None:
                sql += f" LIMIT {query.arg(limit)}"
            rows = await conn.fetch(sql, *query.args)
        return [Bucket(r["b"], r["count"], r["sum"], r["min"], r["max"]) for r in rows]

    async def stream_raw(
        self, device_id: str, metric: str, start: datetime, end: datetime, batch: int = 5000
    ) -> AsyncIterator[list[asyncpg.Record]]:
        """Every point of one metric in the range, oldest first, in lists of ``batch`` rows at most.

        A server-side cursor in a read-only transaction on a connection held until the iteration ends:
        at most ``batch`` rows are in memory, whatever the range.
        """
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            cursor = await conn.cursor(
                "SELECT ts, value, value_text FROM telemetry"
                " WHERE device_id = $1 AND metric = $2 AND ts >= $3 AND ts < $4 ORDER BY ts",
                device_id,
                metric,
                start,
                end,
            )
            while rows := await cursor.fetch(batch):
                yield rows

    async def copy_raw(
        self, device_id: str, metric: str, start: datetime, end: datetime, fmt: str, queued: int = 8
    ) -> AsyncIterator[bytes]:
        """Every point of one metric in the range, oldest first, formatted by PostgreSQL (``COPY ... TO
        STDOUT``): ``csv`` lines ``ts,device_id,metric,value`` or ``ndjson`` objects, in chunks as they
        arrive.

        At most ``queued`` chunks wait for the consumer: past that the copy stops reading from the socket,
        so memory stays constant whatever the range. Times are RFC 3339 in UTC (``Z``), the fraction of a
        second only when there is one.
        """
        ts = "rtrim(rtrim(to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), '0'), '.') || 'Z'"
        where = "WHERE device_id = $1 AND metric = $2 AND ts >= $3 AND ts < $4 ORDER BY ts"
        if fmt == "csv":
            query = (
                f"SELECT {ts}, device_id, metric, coalesce(value::text, value_text) FROM telemetry {where}"
            )
            options: dict[str, Any] = {"format": "csv"}
        else:
            query = f"""SELECT '{{"ts":"' || {ts} || '","device_id":' || to_json(device_id)::text
                || ',"metric":' || to_json(metric)::text
                || ',"value":' || coalesce(value::text, to_json(value_text)::text) || '}}'
                FROM telemetry {where}"""
            # CSV with a delimiter and a quote that JSON text never holds raw (it escapes control
            # characters): each line is the JSON as PostgreSQL wrote it, nothing escaped twice.
            options = {"format": "csv", "delimiter": "\x01", "quote": "\x02"}
        chunks: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(maxsize=queued)

        async def copy() -> None:
            try:
                async with self.pool.acquire() as conn:
                    await conn.copy_from_query(
                        query, device_id, metric, start, end, output=chunks.put, **options
                    )
            except Exception as exc:  # the consumer is there to take it (else this task is cancelled)
                await chunks.put(exc)
                return
            await chunks.put(None)

        task = asyncio.create_task(copy())
        try:
            while (chunk := await chunks.get()) is not None:
                if isinstance(chunk, Exception):
                    raise chunk
                yield bytes(chunk)
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def latest(self, device_id: str) -> dict[str, tuple[float | str, datetime]]:
        """Latest value and time of every metric of a device, from the table."""
        rows = await self.pool.fetch(_LATEST, device_id)
        return {r["metric"]: (_value(r), r["ts"]) for r in rows}
