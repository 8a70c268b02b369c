"""Commands sent to devices: the API creates them and marks them sent or failed (with the lifecycle
statements of :mod:`iot_common.commands`, which ingest's rule actions use too); ingest records answers."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import asyncpg

from iot_api.repositories.sql import Query
from iot_api.schemas.commands import Command
from iot_common.commands import COMMAND_COLUMNS, create_command, mark_failed, mark_sent


def _command(row: asyncpg.Record | None) -> Command | None:
    return None if row is None else Command(**row)


class CommandRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def create(self, device_id: str, name: str, params: dict[str, Any], ttl_s: int) -> Command | None:
        """Insert a ``pending`` command expiring in ``ttl_s`` seconds; None when the device is unknown.

        The row takes its device's tenant (migration 0010): the caller checks first that the device is the
        requesting tenant's."""
        try:
            row = await create_command(self.pool, device_id, name, params, timedelta(seconds=ttl_s))
        except asyncpg.ForeignKeyViolationError:
            return None
        return _command(row)

    async def mark_sent(self, command_id: str) -> Command | None:
        """``pending`` -> ``sent``; None when the device's answer was recorded meanwhile (it is kept)."""
        return _command(await mark_sent(self.pool, command_id))

    async def mark_failed(self, command_id: str, error: str) -> Command | None:
        """``pending`` -> ``failed`` with ``error``; None when the device's answer was recorded meanwhile."""
        return _command(await mark_failed(self.pool, command_id, error))

    async def get(self, tenant_id: uuid.UUID, device_id: str, command_id: uuid.UUID) -> Command | None:
        return _command(
            await self.pool.fetchrow(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE tenant_id = $1 AND id = $2 AND device_id = $3",
                tenant_id,
                command_id,
                device_id,
            )
        )

    async def list(
        self, tenant_id: uuid.UUID, device_id: str, *, after: tuple[Any, ...] | None, limit: int
    ) -> list[Command]:
        """A device's commands, newest first, after the position ``after`` (created_at, id)."""
        query = Query(tenant_id, device_id)
        query.where("tenant_id = $1 AND device_id = $2")
        # The table's columns (not the text ``id`` of COMMAND_COLUMNS) order and position the page.
        query.after(("commands.created_at", "commands.id"), after, descending=True)
        rows = await self.pool.fetch(
            f"SELECT {COMMAND_COLUMNS} FROM commands {query.sql()}"
            f" ORDER BY commands.created_at DESC, commands.id DESC LIMIT {query.arg(limit)}",
            *query.args,
        )
        return [Command(**r) for r in rows]
