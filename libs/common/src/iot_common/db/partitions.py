"""Daily range partitions of the ``telemetry`` table: created ahead of time, dropped past retention.

Each partition ``telemetry_pYYYYMMDD`` holds one UTC day. Queries on a time range touch only the
partitions they need, and retention is a ``DROP TABLE`` instead of a slow ``DELETE``.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

PARENT = "telemetry"
MAINTENANCE_LOCK_KEY = 0x10770002
"""Advisory lock taken by partition maintenance so replicas do not race."""

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

_NAME_RE = re.compile(r"^telemetry_p(\d{8})$")
log = structlog.stdlib.get_logger(__name__)


def partition_name(day: date) -> str:
    return f"{PARENT}_p{day:%Y%m%d}"


def today_utc() -> date:
    return datetime.now(UTC).date()


async def list_partitions(conn: Conn) -> list[date]:
    """Days that have a telemetry partition, oldest first."""
    rows = await conn.fetch(
        """
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = $1 AND p.relnamespace = current_schema()::regnamespace
        """,
        PARENT,
    )
    days = []
    for row in rows:
        match = _NAME_RE.match(row["relname"])
        if match:
            days.append(datetime.strptime(match.group(1), "%Y%m%d").date())
    return sorted(days)


async def ensure_partitions(conn: Conn, first: date, last: date) -> list[date]:
    """Create the missing daily partitions from ``first`` to ``last`` inclusive; return the created days."""
    existing = set(await list_partitions(conn))
    created = []
    day = first
    while day <= last:
        if day not in existing:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF {PARENT} "
                f"FOR VALUES FROM ('{day.isoformat()}+00') TO ('{(day + timedelta(days=1)).isoformat()}+00')"
            )
            created.append(day)
        day += timedelta(days=1)
    return created


async def drop_expired_partitions(conn: Conn, retention_days: int, today: date) -> list[date]:
    """Drop partitions whose whole day is older than ``retention_days`` before ``today``."""
    cutoff = today - timedelta(days=retention_days)
    dropped = []
    for day in await list_partitions(conn):
        if day < cutoff:
            await conn.execute(f"DROP TABLE IF EXISTS {partition_name(day)}")
            dropped.append(day)
    return dropped


async def maintain_partitions(
    conn: Conn,
    *,
    retention_days: int,
    ahead_days: int,
    today: date | None = None,
    wait: bool = False,
) -> tuple[list[date], list[date]] | None:
    """Create partitions for the retention window plus ``ahead_days``, drop expired ones.

    Runs under a transaction-level advisory lock. When another process holds it, returns None at once,
    or with ``wait`` waits for it and then does what is left.
    """
    day = today or today_utc()
    async with conn.transaction():
        if wait:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MAINTENANCE_LOCK_KEY)
        elif not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", MAINTENANCE_LOCK_KEY):
            return None
        created = await ensure_partitions(
            conn, day - timedelta(days=retention_days), day + timedelta(days=ahead_days)
        )
        dropped = await drop_expired_partitions(conn, retention_days, day)
    if created or dropped:
        log.info(
            "telemetry partitions maintained",
            created=[d.isoformat() for d in created],
            dropped=[d.isoformat() for d in dropped],
        )
    return created, dropped
