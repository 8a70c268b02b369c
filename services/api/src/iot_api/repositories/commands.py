"""Commands sent to devices: the API creates them and marks them sent or failed (with the lifecycle
statements of :mod:`iot_common.commands`, which ingest's rule actions use too); ingest records answers."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal

import asyncpg

from iot_api.repositories.sql import Query
from iot_api.schemas.commands import Command
from iot_common.commands import COMMAND_COLUMNS, create_command, device_status_locked, mark_failed, mark_sent


def _command(row: asyncpg.Record | None) -> Command | None:
    return None if row is None else Command(**row)


class CommandRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def create(
        self,
        tenant_id: uuid.UUID,
        device_id: str,
        name: str,
        params: dict[str, Any],
        ttl_s: int,
        on_queued: Callable[[Command], Awaitable[object]] | None = None,
    ) -> Command | None:
        """Insert a command expiring in ``ttl_s`` seconds: ``queued`` when the device is ``offline``, else
        ``pending`` (to be published now); None when the device is not the tenant's.

        The status is read and the row inserted under the device's queue lock (the one ingest's flush
        takes after committing an ``online`` status), so a device coming online meanwhile cannot leave the
        command queued until its next reconnection. ``on_queued`` runs before the commit, still under the
        lock: what it publishes comes before anything ingest's flush publishes about the command."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await device_status_locked(conn, tenant_id, device_id)
            if status is None:
                return None
            state: Literal["pending", "queued"] = "queued" if status == "offline" else "pending"
            try:
                row = await create_command(conn, device_id, name, params, timedelta(seconds=ttl_s), state)
            except asyncpg.ForeignKeyViolationError:
                return None
            command = Command(**row)
            if command.state == "queued" and on_queued is not None:
                await on_queued(command)
        return command

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
