"""Devices table: every statement names the tenant."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from iot_api.repositories.sql import Query
from iot_api.schemas.devices import Device

_COLUMNS = "id, name, type, status, attributes, last_seen, created_at, updated_at"


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


ImportRecord = tuple[int, str, str, str, str, str | None]
"""A row of an import: line, id, name, type, attributes (JSON text), secret hash (None: no credential)."""


class DeviceLimitReached(Exception):
    """The tenant owns ``limit`` devices already (``tenants.max_devices``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the tenant's limit of {limit} devices is reached")
        self.limit = limit


class DeviceRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, tenant_id: uuid.UUID, device_id: str) -> Device | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM devices WHERE tenant_id = $1 AND id = $2", tenant_id, device_id
        )
        return None if row is None else Device(**row)

    async def get_many(self, tenant_id: uuid.UUID, device_ids: list[str]) -> list[Device]:
        """Those of ``device_ids`` that are devices of the tenant."""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM devices WHERE tenant_id = $1 AND id = ANY($2::text[])",
            tenant_id,
            device_ids,
        )
        return [Device(**r) for r in rows]

    async def create(
        self, tenant_id: uuid.UUID, device_id: str, name: str, type_: str, attributes: dict[str, Any]
    ) -> Device | None:
        """Insert a device; None when the id is taken (in any tenant: ids are global); raise
        :class:`DeviceLimitReached` when the tenant has its ``max_devices`` already.

        The tenant's row is locked for the transaction, so that concurrent creations cannot pass the limit.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            limit = await conn.fetchval("SELECT max_devices FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
            if limit is not None:
                count = await conn.fetchval("SELECT count(*) FROM devices WHERE tenant_id = $1", tenant_id)
                if count >= limit:
                    raise DeviceLimitReached(limit)
            row = await conn.fetchrow(
                f"""
                INSERT INTO devices (tenant_id, id, name, type, attributes) VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}
                """,
                tenant_id,
                device_id,
                name,
                type_,
                attributes,
            )
        return None if row is None else Device(**row)

    async def import_many(
        self,
        tenant_id: uuid.UUID,
        rows: list[ImportRecord],
        before_commit: Callable[[], Awaitable[None]],
    ) -> list[tuple[int, str]]:
        """Insert all ``rows`` (and the credentials of those with a secret hash) in one transaction, or none.

        Returns the (line, id) of the rows whose id is taken (by any tenant), and then inserts nothing.
        Raises :class:`DeviceLimitReached` when the rows would take the tenant past its ``max_devices``
        (its row is locked for the transaction, as in :meth:`create`). The rows go through ``COPY`` into a
        temporary table, then one ``INSERT ... SELECT`` per table. ``before_commit`` runs last, inside the
        transaction (the broker's provisioning): if it raises, nothing is stored.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            limit = await conn.fetchval("SELECT max_devices FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
            if limit is not None:
                count = await conn.fetchval("SELECT count(*) FROM devices WHERE tenant_id = $1", tenant_id)
                if count + len(rows) > limit:
                    raise DeviceLimitReached(limit)
            await conn.execute(
                "CREATE TEMPORARY TABLE device_import (line int, id text, name text, type text,"
                " attributes text, secret_hash text) ON COMMIT DROP"
            )
            await conn.copy_records_to_table("device_import", records=rows)
            taken = await conn.fetch(
                "SELECT i.line, i.id FROM device_import i JOIN devices d ON d.id = i.id ORDER BY i.line"
            )
            if taken:
                return [(r["line"], r["id"]) for r in taken]
            await conn.execute(
                "INSERT INTO devices (tenant_id, id, name, type, attributes)"
                " SELECT $1, id, name, type, attributes::jsonb FROM device_import",
                tenant_id,
            )
            await conn.execute(
                "INSERT INTO device_credentials (device_id, secret_hash)"
                " SELECT id, secret_hash FROM device_import WHERE secret_hash IS NOT NULL"
            )
            await before_commit()
        return []

    async def update(self, tenant_id: uuid.UUID, device_id: str, changes: dict[str, Any]) -> Device | None:
        """Set the given columns (names come from the service, never from the client)."""
        query = Query(tenant_id, device_id)
        row = await self.pool.fetchrow(
            f"UPDATE devices SET {query.assignments(changes)}, updated_at = now()"
            f" WHERE tenant_id = $1 AND id = $2 RETURNING {_COLUMNS}",
            *query.args,
        )
        return None if row is None else Device(**row)

    async def delete(self, tenant_id: uuid.UUID, device_id: str) -> bool:
        """Delete the tenant's device and its stored telemetry (raw and every rollup level), in one
        transaction: device ids are global, so a later device with the same id, in any tenant, must not
        inherit its history. False when the device is not the tenant's."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "DELETE FROM devices WHERE tenant_id = $1 AND id = $2", tenant_id, device_id
            )
            if not status.endswith(" 1"):
                return False
            # One index range per daily partition (the primary key starts with device_id): no scan.
            await conn.execute("DELETE FROM telemetry WHERE device_id = $1", device_id)
            for table in (
                "telemetry_minutely",
                "telemetry_hourly",
                "telemetry_daily",
                "telemetry_rollup_dirty",
            ):
                await conn.execute(f"DELETE FROM {table} WHERE device_id = $1", device_id)
        return True

    async def list(
        self,
        tenant_id: uuid.UUID,
        *,
        limit: int,
        after: tuple[Any, ...] | None,
        type_: str | None,
        status: str | None,
        search: str | None,
    ) -> list[Device]:
        """The tenant's devices ordered by id, after the position ``after`` (an id); ``limit`` at most."""
        query = Query(tenant_id)
        query.where("tenant_id = $1")
        query.after(("id",), after, descending=False)
        query.equals("type", type_)
        query.equals("status", status)
        if search:
            pattern = query.arg(_like(search))
            query.where(f"(name ILIKE {pattern} OR id ILIKE {pattern})")
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM devices {query.sql()} ORDER BY id LIMIT {query.arg(limit)}", *query.args
        )
        return [Device(**r) for r in rows]
