"""The database schema: migrations, telemetry partitions and retention, idempotent telemetry."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from iot_common.db import connect
from iot_common.db.migrate import MigrationError, apply_migrations, load_migrations
from iot_common.db.partitions import (
    ensure_partitions,
    list_partitions,
    maintain_partitions,
    today_utc,
)
from iot_common.messages import Reading
from iot_ingest.telemetry import insert_telemetry

EXPECTED_TABLES = {
    "devices",
    "telemetry",
    "ingest_rejects",
    "users",
    "api_keys",
    "alert_rules",
    "alerts",
    "commands",
    "action_runs",
    "schema_migrations",
    # 0003: hourly rollup of telemetry, filled by the API service
    "telemetry_hourly",
    "telemetry_rollup_state",
    # 0005: MQTT credentials of devices, issued by the API
    "device_credentials",
    # 0010: tenants and the audit log of the API
    "tenants",
    "audit_events",
    # 0011: device state (desired/reported, versioned) and its history
    "device_state",
    "device_state_history",
    # 0013: minute and day rollups, minutes that received late readings
    "telemetry_minutely",
    "telemetry_daily",
    "telemetry_rollup_dirty",
}


async def _tables(conn: asyncpg.Connection[Any]) -> set[str]:
    rows = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
        "AND relkind IN ('r', 'p') AND NOT relispartition"
    )
    return {r["relname"] for r in rows}


async def test_migrations_apply_once_and_a_second_run_changes_nothing(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        first = await apply_migrations(conn)
        second = await apply_migrations(conn)
        assert first == [m.version for m in load_migrations()]
        assert second == []
        assert await _tables(conn) == EXPECTED_TABLES
    finally:
        await conn.close()


async def test_two_concurrent_migrations_leave_one_schema(empty_database_url: str) -> None:
    conns = [await connect(empty_database_url) for _ in range(2)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        versions = [m.version for m in load_migrations()]
        assert sorted(results, key=len) == [[], versions]
        recorded = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == versions
        assert await _tables(conns[0]) == EXPECTED_TABLES
    finally:
        for c in conns:
            await c.close()


async def test_a_migration_edited_after_it_was_applied_is_refused(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        migrations = load_migrations()
        await apply_migrations(conn, migrations)
        edited = [replace(migrations[0], sql=migrations[0].sql + "\n-- edited")]
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(conn, edited)
    finally:
        await conn.close()


async def test_partitions_cover_today_and_the_days_ahead(db: asyncpg.Connection[Any]) -> None:
    days = await list_partitions(db)
    today = today_utc()
    assert today in days
    assert today + timedelta(days=7) in days
    start = datetime.combine(today, datetime.min.time(), UTC) + timedelta(hours=1)
    rows = await db.fetch(
        f"EXPLAIN SELECT * FROM telemetry WHERE ts >= '{start.isoformat()}' "
        f"AND ts < '{(start + timedelta(hours=1)).isoformat()}'"
    )
    plan = "\n".join(r[0] for r in rows)
    assert f"telemetry_p{today:%Y%m%d}" in plan
    assert f"telemetry_p{today - timedelta(days=1):%Y%m%d}" not in plan


async def test_retention_drops_exactly_the_partitions_past_the_limit(db: asyncpg.Connection[Any]) -> None:
    today = date(2026, 6, 15)
    await ensure_partitions(db, date(2026, 6, 1), date(2026, 6, 20))
    result = await maintain_partitions(db, retention_days=5, ahead_days=3, today=today)
    assert result is not None
    _, dropped = result
    june = [d for d in await list_partitions(db) if d.year == 2026 and d.month == 6]
    assert dropped[-1] == date(2026, 6, 9)
    assert all(d < date(2026, 6, 10) for d in dropped)
    assert min(june) == date(2026, 6, 10)
    assert date(2026, 6, 18) in june


async def test_maintenance_is_skipped_while_another_process_holds_its_lock(
    database_url: str,
) -> None:
    holder, other = await connect(database_url), await connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(x'10770002'::bigint)")
            assert await maintain_partitions(other, retention_days=30, ahead_days=7) is None
    finally:
        await holder.close()
        await other.close()


async def test_a_duplicate_reading_is_stored_once(db: asyncpg.Connection[Any]) -> None:
    ts = datetime.now(UTC).replace(microsecond=123000)
    reading = Reading("dev-dup", ts, {"temperature": 21.5, "state": "ok"})
    assert await insert_telemetry(db, [reading]) == (2, None, ())
    # A redelivery stores nothing, and says which readings were new (none), so none is published again.
    assert await insert_telemetry(db, [reading, reading]) == (0, set(), ())
    later = Reading("dev-dup", ts + timedelta(seconds=1), {"temperature": 22.0})
    assert await insert_telemetry(db, [reading, later]) == (1, {("dev-dup", later.ts)}, ())
    rows = await db.fetch(
        "SELECT metric, value, value_text FROM telemetry WHERE device_id = 'dev-dup' ORDER BY ts, metric"
    )
    assert [tuple(r) for r in rows] == [
        ("state", None, "ok"),
        ("temperature", 21.5, None),
        ("temperature", 22.0, None),
    ]
