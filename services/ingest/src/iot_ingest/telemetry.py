"""Writing telemetry rows: one round trip per batch, and a reading delivered twice is stored once.

Readings older than :data:`~iot_common.db.rollups.LATE_AFTER` also mark their minute for the API's rollup
job, in the same statement (only in a batch that has such readings), so that rollups of hours and days
already rolled up are corrected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
       CASE WHEN count(*) < ${total} THEN coalesce(array_agg(ts), '{{}}') END AS stamps{more}
FROM inserted
"""
"""The new rows, and only when some rows were there before (a redelivery), which readings they belong to:
the normal batch gets one small row back."""

_BATCH = """
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::float8[], $5::text[])
        AS u(device_id, metric, ts, value, value_text)"""
_INSERTED = """
    INSERT INTO telemetry (device_id, metric, ts, value, value_text)
    SELECT * FROM {source}
    ON CONFLICT (device_id, metric, ts) DO NOTHING
    RETURNING device_id, ts"""
_MARKED = """
    INSERT INTO telemetry_rollup_dirty (device_id, metric, bucket)
    SELECT DISTINCT device_id, metric, date_bin('1 minute', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00')
    FROM batch WHERE value IS NOT NULL AND ts < $6
    ORDER BY 1, 2, 3
    ON CONFLICT (device_id, metric, bucket) DO UPDATE SET marked_at = now(){returning}"""
_TOUCHED = """
    SELECT d.id, d.status, u.seen
    FROM devices d JOIN unnest(${ids}::text[], ${stamps}::timestamptz[]) AS u(id, seen) ON d.id = u.id
    WHERE d.last_seen IS NULL OR d.last_seen < u.seen OR d.status = 'offline'
    ORDER BY d.id COLLATE "C"
    FOR NO KEY UPDATE OF d
), touched AS (
    UPDATE devices d
    SET last_seen = GREATEST(d.last_seen, l.seen),
        status = CASE WHEN l.status = 'offline' THEN 'online' ELSE d.status END,
        updated_at = CASE WHEN l.status = 'offline' THEN now() ELSE d.updated_at END
    FROM locked l
    WHERE d.id = l.id
    RETURNING d.id, l.status = 'offline' AS woke"""
"""The devices' part of :data:`INSERT_TELEMETRY_TOUCHING`: what ``UPDATE_LAST_SEEN`` and
``MARK_ONLINE_BY_READING`` (:mod:`iot_ingest.writer`) do, in one ``UPDATE`` (two data-modifying CTEs must
not update one row in one statement). ``locked`` locks the rows to change in id order (concurrent replicas
lock device rows in one order and cannot deadlock; ``COLLATE "C"``: the code point order in which the
writer's other statements lock them, whatever the database's collation) and reads their status before the
update (the latest committed one: ``FOR NO KEY UPDATE`` under READ COMMITTED), so that ``woke`` tells the
devices it set ``online``."""


def _statement(*, late: bool, touch: bool) -> str:
    """One telemetry statement: the batch's rows, with the rollup marks of late readings (``$6``: the
    cutoff) and the devices' last-seen time and status, as asked; the parameters after the five columns
    are, in order: the cutoff, the count of rows, the devices' ids and their last-seen times."""
    total = 7 if late else 6
    ctes: list[tuple[str, str]] = []
    more = ""
    if late:
        ctes.append(("batch", _BATCH))
        ctes.append(("marked", _MARKED.format(returning="\n    RETURNING 1" if touch else "")))
        ctes.append(("inserted", _INSERTED.format(source="batch")))
    else:
        ctes.append(("inserted", _INSERTED.format(source=_BATCH.strip().removeprefix("SELECT * FROM "))))
    if touch:
        ctes.append(("locked", _TOUCHED.format(ids=total + 1, stamps=total + 2)))
        # Evaluated in this order, after the rows and the marks: the marks are locked before the devices,
        # as when the devices were a statement of their own.
        if late:
            more += ",\n       (SELECT count(*) FROM marked) AS marked"
        more += ",\n       (SELECT coalesce(array_agg(id), '{}') FROM touched WHERE woke) AS woke"
    body = ", ".join(
        f"{name} AS MATERIALIZED ({sql}\n)" if name == "locked" else f"{name} AS ({sql}\n)"
        for name, sql in ctes
    )
    return "WITH " + body + _COUNT_INSERTED.format(total=total, more=more)


INSERT_TELEMETRY = _statement(late=False, touch=False)
INSERT_TELEMETRY_MARKING_LATE = _statement(late=True, touch=False)
""":data:`INSERT_TELEMETRY` for a batch with late readings (``$6``: the cutoff), in the same statement:
their minutes are marked in ``telemetry_rollup_dirty`` (each once, in key order: concurrent replicas lock
marks in the same order). ``DO UPDATE`` rather than ``DO NOTHING``: the row lock makes the rollup job's
delete of a mark wait for the transaction that touched it, so the job's recomputation sees the reading."""
INSERT_TELEMETRY_TOUCHING = _statement(late=False, touch=True)
"""The ordinary batch (readings only) in one round trip: :data:`INSERT_TELEMETRY` that also moves the
devices' ``last_seen`` forward and sets ``online`` those marked ``offline`` (their ids in ``woke``)."""
INSERT_TELEMETRY_MARKING_LATE_TOUCHING = _statement(late=True, touch=True)
""":data:`INSERT_TELEMETRY_TOUCHING` for a batch with late readings."""


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
    woke: tuple[str, ...] = ()
    """With ``seen``: the devices set ``online`` because they were marked ``offline`` (any order)."""


async def insert_telemetry(
    conn: Conn,
    readings: Iterable[Reading],
    *,
    now: datetime | None = None,
    seen: Mapping[str, datetime] | None = None,
) -> Inserted:
    """Insert the readings' rows, skipping rows already stored, and mark the minutes of late readings for
    the rollup job; return the number of new rows (and which readings they are, after a redelivery).

    ``seen`` (device id -> time last heard from), in the same statement: each device's ``last_seen``
    moves forward to it, and a device marked ``offline`` is set ``online``
    (:data:`INSERT_TELEMETRY_TOUCHING`).
    """
    batch = readings if isinstance(readings, list) else list(readings)
    columns = telemetry_columns(batch)
    if not columns[0]:
        return Inserted(0, None)
    total = len(columns[0])
    cutoff = (now or datetime.now(UTC)) - LATE_AFTER
    late = any(reading.ts < cutoff for reading in batch)
    args: list[Any] = [*columns]
    if late:
        args.append(cutoff)
    args.append(total)
    if seen:
        ids = list(seen)
        args += (ids, [seen[i] for i in ids])
        query = INSERT_TELEMETRY_MARKING_LATE_TOUCHING if late else INSERT_TELEMETRY_TOUCHING
    else:
        query = INSERT_TELEMETRY_MARKING_LATE if late else INSERT_TELEMETRY
    row = await conn.fetchrow(query, *args)
    assert row is not None
    woke = tuple(row["woke"]) if seen else ()
    if row["devices"] is None:
        return Inserted(int(row["n"]), None, woke)
    return Inserted(int(row["n"]), set(zip(row["devices"], row["stamps"], strict=True)), woke)
