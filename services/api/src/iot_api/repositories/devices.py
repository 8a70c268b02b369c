"""Devices table."""

from __future__ import annotations

from typing import Any

import asyncpg

from iot_api.repositories.sql import Query
from iot_api.schemas.devices import Device

_COLUMNS = "id, name, type, status, attributes, last_seen, created_at, updated_at"


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class DeviceRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, device_id: str) -> Device | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM devices WHERE id = $1", device_id)
        return None if row is None else Device(**row)

    async def create(
        self, device_id: str, name: str, type_: str, attributes: dict[str, Any]
    ) -> Device | None:
        """Insert a device; None when the id is taken."""
        row = await self.pool.fetchrow(
            f"""
            INSERT INTO devices (id, name, type, attributes) VALUES ($1, $2, $3, $4)
            ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}
            """,
            device_id,
            name,
            type_,
            attributes,
        )
        return None if row is None else Device(**row)

    async def update(self, device_id: str, changes: dict[str, Any]) -> Device | None:
        """Set the given columns (names come from the service, never from the client)."""
        query = Query(device_id)
        row = await self.pool.fetchrow(
            f"UPDATE devices SET {query.assignments(changes)}, updated_at = now() WHERE id = $1"
            f" RETURNING {_COLUMNS}",
            *query.args,
        )
        return None if row is None else Device(**row)

    async def delete(self, device_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM devices WHERE id = $1", device_id)
        return status.endswith(" 1")

    async def list(
        self,
        *,
        limit: int,
        after: tuple[Any, ...] | None,
        type_: str | None,
        status: str | None,
        search: str | None,
    ) -> list[Device]:
        """Devices ordered by id, after the position ``after`` (an id); ``limit`` rows at most."""
        query = Query()
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
