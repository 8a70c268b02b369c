"""Device state rows (``device_state``, ``device_state_history``), with the statements of
:mod:`iot_common.state` that ingest uses too."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from iot_api.schemas.state import StateChange
from iot_common.state import DeviceState, Publish, apply_change, clear_desired, publish_desired, read_state


class StateRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, tenant_id: uuid.UUID, device_id: str) -> DeviceState:
        """The device's state (version 0 and empty documents when it never had one)."""
        async with self.pool.acquire() as conn:
            return await read_state(conn, str(tenant_id), device_id)

    async def patch_desired(
        self,
        tenant_id: uuid.UUID,
        device_id: str,
        patch: dict[str, Any],
        actor: str,
        at: datetime,
        expected_version: int | None,
    ) -> DeviceState:
        """Merge ``patch`` into the desired state in one transaction (the row locked: concurrent patches
        of one device serialize); :class:`~iot_common.state.StaleVersion`, :class:`StateProblem` refuse."""
        async with self.pool.acquire() as conn, conn.transaction():
            state = await apply_change(
                conn,
                str(tenant_id),
                device_id,
                "desired",
                patch,
                actor,
                at=at,
                expected_version=expected_version,
            )
        assert state is not None
        return state

    async def history(
        self, tenant_id: uuid.UUID, device_id: str, *, after: tuple[Any, ...] | None, limit: int
    ) -> list[StateChange]:
        """A device's state changes, newest first, after the position ``after`` (version)."""
        rows = await self.pool.fetch(
            """
            SELECT version, side, patch, actor, applied_version, at FROM device_state_history
            WHERE tenant_id = $1 AND device_id = $2 AND ($3::bigint IS NULL OR version < $3)
            ORDER BY version DESC LIMIT $4
            """,
            tenant_id,
            device_id,
            after[0] if after else None,
            limit,
        )
        return [StateChange(**r) for r in rows]

    async def clear_desired(self, device_id: str, publish: Publish) -> None:
        """Remove the device's retained desired message (see :func:`iot_common.state.clear_desired`)."""
        await clear_desired(self.pool, device_id, publish)

    async def publish_desired(self, device_id: str, publish: Publish) -> int:
        """Publish the device's current desired message under its advisory lock (see
        :func:`iot_common.state.publish_desired`)."""
        return await publish_desired(self.pool, [device_id], publish)
