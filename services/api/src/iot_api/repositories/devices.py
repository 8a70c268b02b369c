"""Devices table."""

from __future__ import annotations

from typing import Any

import asyncpg

from iot_api.schemas import Device

_COLUMNS = "id, name, type, status, attributes, last_seen, created_at, updated_at"


def _device(row: asyncpg.Record) -> Device:
    return Device(
        id=row["id"],
        name=row["name"],
        type=row["type"],
        status=row["status"],
        attributes=row["attributes"],
        last_seen=row["last_seen"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class DeviceRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, device_id: str) -> Device | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM devices WHERE id = $1", device_id)
        return None if row is None else _device(row)

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
        return None if row is None else _device(row)

    async def update(self, device_id: str, changes: dict[str, Any]) -> Device | None:
        """Set the given columns (names come from the service, never from the client)."""
        sets = [f"{column} = ${i}" for i, column in enumerate(changes, start=2)]
        sets.append("updated_at = now()")
        row = await self.pool.fetchrow(
            f"UPDATE devices SET {', '.join(sets)} WHERE id = $1 RETURNING {_COLUMNS}",
            device_id,
            *changes.values(),
        )
        return None if row is None else _device(row)

    async def delete(self, device_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM devices WHERE id = $1", device_id)
        return status.endswith(" 1")

    async def list(
        self,
        *,
        limit: int,
        after: str | None,
        type_: str | None,
        status: str | None,
        search: str | None,
    ) -> list[Device]:
        """Devices ordered by id, after the id ``after``; ``limit`` rows at most."""
        clauses: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if after is not None:
            clauses.append(f"id > {arg(after)}")
        if type_ is not None:
            clauses.append(f"type = {arg(type_)}")
        if status is not None:
            clauses.append(f"status = {arg(status)}")
        if search:
            pattern = arg(_like(search))
            clauses.append(f"(name ILIKE {pattern} OR id ILIKE {pattern})")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM devices {where} ORDER BY id LIMIT {arg(limit)}", *args
        )
        return [_device(r) for r in rows]
