"""Commands sent to devices; the API creates them and marks them sent or failed, ingest records answers."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from iot_api.schemas import Command

_COLUMNS = "id, device_id, name, params, state, result, error, created_at, updated_at, expires_at"


def _command(row: asyncpg.Record) -> Command:
    return Command(
        id=str(row["id"]),
        device_id=row["device_id"],
        name=row["name"],
        params=row["params"],
        state=row["state"],
        result=row["result"],
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
    )


class CommandRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def create(self, device_id: str, name: str, params: dict[str, Any], ttl_s: int) -> Command | None:
        """Insert a ``pending`` command expiring in ``ttl_s`` seconds; None when the device is unknown."""
        try:
            row = await self.pool.fetchrow(
                f"""
                INSERT INTO commands (device_id, name, params, expires_at)
                VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING {_COLUMNS}
                """,
                device_id,
                name,
                params,
                float(ttl_s),
            )
        except asyncpg.ForeignKeyViolationError:
            return None
        assert row is not None
        return _command(row)

    async def mark(self, command_id: str, state: str, error: str | None = None) -> Command | None:
        """Move a ``pending`` command to ``state``; a device's answer recorded meanwhile is kept."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE commands SET state = $2, error = $3, updated_at = now()
            WHERE id = $1 AND state = 'pending' RETURNING {_COLUMNS}
            """,
            uuid.UUID(command_id),
            state,
            error,
        )
        return None if row is None else _command(row)

    async def get(self, device_id: str, command_id: uuid.UUID) -> Command | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM commands WHERE id = $1 AND device_id = $2", command_id, device_id
        )
        return None if row is None else _command(row)

    async def list(
        self, device_id: str, *, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[Command]:
        """A device's commands, newest first, after the position ``after`` (created_at, id)."""
        args: list[Any] = [device_id, limit]
        position = ""
        if after is not None:
            position = "AND (created_at, id) < ($3, $4)"
            args.extend(after)
        rows = await self.pool.fetch(
            f"""
            SELECT {_COLUMNS} FROM commands WHERE device_id = $1 {position}
            ORDER BY created_at DESC, id DESC LIMIT $2
            """,
            *args,
        )
        return [_command(r) for r in rows]
