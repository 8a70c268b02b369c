"""Migration 0010 (tenants) on a database that already holds data: every row lands in `default`."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from iot_common.db import connect
from iot_common.db.migrate import apply_migrations, load_migrations
from iot_common.tenancy import DEFAULT_TENANT_ID

TENANTS_VERSION = 10


async def _seed_previous_schema(conn: asyncpg.Connection[Any]) -> None:
    """Rows of every kind, written with the schema before tenants (as a running release wrote them)."""
    await conn.execute(
        """
        INSERT INTO devices (id, type) VALUES ('old-1', 'thermo'), ('old-2', 'pump');
        INSERT INTO users (email, password_hash, role) VALUES
            ('root@example.com', 'h', 'admin'), ('ops@example.com', 'h', 'user'),
            ('look@example.com', 'h', 'viewer');
        INSERT INTO api_keys (name, prefix, key_hash, scopes, created_by)
            SELECT 'k', 'aaaaaaaaaaaa', 'hash', ARRAY['write'], id FROM users
            WHERE email = 'root@example.com';
        INSERT INTO alert_rules (name, device_id, metric, op, threshold)
            VALUES ('one device', 'old-1', 't', '>', 1);
        INSERT INTO alert_rules (name, device_type, metric, op, threshold)
            VALUES ('by type', 'pump', 'p', '<', 2);
        INSERT INTO alerts (rule_id, device_id, metric, severity, threshold)
            SELECT id, 'old-1', 't', 'warning', 1 FROM alert_rules WHERE name = 'one device';
        INSERT INTO commands (device_id, name) VALUES ('old-2', 'reboot');
        INSERT INTO action_runs (alert_id, rule_id, trigger, kind, target)
            SELECT id, rule_id, 'open', 'webhook', 'https://example.com/' FROM alerts;
        INSERT INTO ingest_rejects (topic, device_id, reason) VALUES
            ('devices/telemetry/old-1', 'old-1', 'invalid_json'),
            ('devices/telemetry/ghost', 'ghost', 'unknown_device'),
            ('devices/x', NULL, 'bad_topic');
        """
    )


@pytest.fixture
async def migrated_with_data(empty_database_url: str) -> Any:
    conn = await connect(empty_database_url)
    try:
        before = [m for m in load_migrations() if m.version < TENANTS_VERSION]
        await apply_migrations(conn, before)
        await _seed_previous_schema(conn)
        applied = await apply_migrations(conn)
        assert TENANTS_VERSION in applied
        yield conn
    finally:
        await conn.close()


async def test_every_existing_row_is_in_the_default_tenant(
    migrated_with_data: asyncpg.Connection[Any],
) -> None:
    conn = migrated_with_data
    tenants = await conn.fetch("SELECT id, name FROM tenants")
    assert [(r["id"], r["name"]) for r in tenants] == [(DEFAULT_TENANT_ID, "default")]
    for table, count in [
        ("devices", 2),
        ("users", 3),
        ("api_keys", 1),
        ("alert_rules", 2),
        ("alerts", 1),
        ("commands", 1),
        ("action_runs", 1),
    ]:
        rows = await conn.fetch(f"SELECT tenant_id FROM {table}")
        assert [r["tenant_id"] for r in rows] == [DEFAULT_TENANT_ID] * count, table
    rejects = await conn.fetch("SELECT device_id, tenant_id FROM ingest_rejects ORDER BY id")
    # A dead letter of a known device is its tenant's; one whose device is unknown has no tenant.
    assert [(r["device_id"], r["tenant_id"]) for r in rejects] == [
        ("old-1", DEFAULT_TENANT_ID),
        ("ghost", None),
        (None, None),
    ]


async def test_former_roles_map_without_gaining_power(migrated_with_data: asyncpg.Connection[Any]) -> None:
    rows = await migrated_with_data.fetch("SELECT email, role, platform_admin FROM users ORDER BY email")
    assert [(r["email"], r["role"], r["platform_admin"]) for r in rows] == [
        ("look@example.com", "viewer", False),
        ("ops@example.com", "operator", False),
        ("root@example.com", "admin", True),
    ]


async def test_rows_written_after_the_migration_follow_their_device_or_rule(
    migrated_with_data: asyncpg.Connection[Any],
) -> None:
    conn = migrated_with_data
    other = await conn.fetchval("INSERT INTO tenants (name) VALUES ('acme') RETURNING id")
    await conn.execute("INSERT INTO devices (id, tenant_id) VALUES ('acme-1', $1)", other)
    # A writer that does not name the tenant (ingest, as before) gets the device's or the rule's.
    command_tenant = await conn.fetchval(
        "INSERT INTO commands (device_id, name) VALUES ('acme-1', 'reboot') RETURNING tenant_id"
    )
    reject_tenant = await conn.fetchval(
        "INSERT INTO ingest_rejects (topic, device_id, reason) VALUES ('t', 'acme-1', 'r')"
        " RETURNING tenant_id"
    )
    rule = await conn.fetchrow(
        "INSERT INTO alert_rules (name, device_id, metric, op, threshold) VALUES ('r', 'acme-1', 'm', '>', 1)"
        " RETURNING id, tenant_id"
    )
    assert rule is not None
    alert_tenant = await conn.fetchval(
        "INSERT INTO alerts (rule_id, device_id, metric, severity, threshold)"
        " VALUES ($1, 'acme-1', 'm', 'info', 1) RETURNING tenant_id",
        rule["id"],
    )
    assert command_tenant == reject_tenant == rule["tenant_id"] == alert_tenant == other
    # A tenant that disagrees with the device's is refused by the database.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(
            "INSERT INTO commands (device_id, name, tenant_id) VALUES ('acme-1', 'x', $1)", DEFAULT_TENANT_ID
        )
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(
            "INSERT INTO alert_rules (name, device_id, metric, op, threshold, tenant_id)"
            " VALUES ('r', 'acme-1', 'm', '>', 1, $1)",
            DEFAULT_TENANT_ID,
        )
    # A rule on a device type names its tenant: never a silent default.
    with pytest.raises(asyncpg.NotNullViolationError):
        await conn.execute(
            "INSERT INTO alert_rules (name, device_type, metric, op, threshold)"
            " VALUES ('r', 'x', 'm', '>', 1)"
        )
    # A tenant that still owns devices cannot be deleted.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("DELETE FROM tenants WHERE id = $1", other)
