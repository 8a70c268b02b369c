"""Tenants (platform admins) and the audit log of each tenant."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from iot_api.queries import TimeRange
from iot_api.repositories.sql import Query
from iot_api.schemas.tenants import AuditEvent, Tenant

_TENANT_COLUMNS = "id::text AS id, name, max_devices, max_readings_per_s, created_at, updated_at"
_AUDIT_COLUMNS = "id, at, actor, actor_kind, action, method, path, target, request_id, status"


class TenantHasDevices(Exception):
    """A tenant that still owns devices is not deleted."""


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "failed"


class TenantRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def exists(self, tenant_id: uuid.UUID) -> bool:
        return bool(
            await self.pool.fetchval("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", tenant_id)
        )

    async def get(self, tenant_id: uuid.UUID) -> Tenant | None:
        row = await self.pool.fetchrow(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE id = $1", tenant_id)
        return None if row is None else Tenant(**row)

    async def create(self, values: dict[str, Any]) -> Tenant | None:
        """A new tenant; None when the name is taken (names compare case-insensitively)."""
        query = Query()
        placeholders = ", ".join(query.arg(v) for v in values.values())
        row = await self.pool.fetchrow(
            f"INSERT INTO tenants ({', '.join(values)}) VALUES ({placeholders})"
            f" ON CONFLICT DO NOTHING RETURNING {_TENANT_COLUMNS}",
            *query.args,
        )
        return None if row is None else Tenant(**row)

    async def update(self, tenant_id: uuid.UUID, changes: dict[str, Any]) -> Tenant | None:
        """Set ``changes`` (names from the service); None when there is no such tenant. Raises asyncpg's
        UniqueViolationError when the new name is taken."""
        query = Query(tenant_id)
        row = await self.pool.fetchrow(
            f"UPDATE tenants SET {query.assignments(changes)}, updated_at = now() WHERE id = $1"
            f" RETURNING {_TENANT_COLUMNS}",
            *query.args,
        )
        return None if row is None else Tenant(**row)

    async def delete(self, tenant_id: uuid.UUID) -> list[str] | None:
        """Delete the tenant with its users, keys, rules, alerts and dead letters; the prefixes of its API
        keys, or None when there is no such tenant. Raises :class:`TenantHasDevices` when it owns devices."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM devices WHERE tenant_id = $1)", tenant_id):
                raise TenantHasDevices
            prefixes = await conn.fetch("SELECT prefix FROM api_keys WHERE tenant_id = $1", tenant_id)
            status = await conn.execute("DELETE FROM tenants WHERE id = $1", tenant_id)
            if not status.endswith(" 1"):
                return None
        return [r["prefix"] for r in prefixes]

    async def list(self, *, after: tuple[Any, ...] | None, limit: int) -> list[Tenant]:
        """Tenants oldest first, after the position ``after`` (created_at, id)."""
        query = Query()
        query.after(("created_at", "tenants.id"), after, descending=False)
        rows = await self.pool.fetch(
            f"SELECT {_TENANT_COLUMNS} FROM tenants {query.sql()}"
            f" ORDER BY created_at, tenants.id LIMIT {query.arg(limit)}",
            *query.args,
        )
        return [Tenant(**r) for r in rows]


class AuditRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def record(self, tenant_ids: list[uuid.UUID], event: dict[str, Any]) -> None:
        """One row per tenant of ``tenant_ids`` for the request ``event`` (its columns)."""
        await self.pool.execute(
            """
            INSERT INTO audit_events (tenant_id, actor, actor_kind, action, method, path, target, request_id,
                                      status)
            SELECT t, $2, $3, $4, $5, $6, $7, $8, $9 FROM unnest($1::uuid[]) AS t
            """,
            tenant_ids,
            event["actor"],
            event["actor_kind"],
            event["action"],
            event["method"],
            event["path"],
            event["target"],
            event["request_id"],
            event["status"],
        )

    async def list(
        self, tenant_id: uuid.UUID, *, at: TimeRange, after: tuple[Any, ...] | None, limit: int
    ) -> list[AuditEvent]:
        """The tenant's events newest first, after the position ``after`` (at, id)."""
        query = Query(tenant_id)
        query.where("tenant_id = $1")
        query.between("at", at.start, at.end)
        query.after(("at", "id"), after, descending=True)
        rows = await self.pool.fetch(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_events {query.sql()}"
            f" ORDER BY at DESC, id DESC LIMIT {query.arg(limit)}",
            *query.args,
        )
        return [AuditEvent(**r, outcome=_outcome(r["status"])) for r in rows]  # type: ignore[arg-type]

    async def purge(self, before: datetime) -> int:
        """Delete the events older than ``before``; how many."""
        status = await self.pool.execute("DELETE FROM audit_events WHERE at < $1", before)
        return int(status.rsplit(" ", 1)[-1])
