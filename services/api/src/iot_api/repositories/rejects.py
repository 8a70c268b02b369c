"""Dead letters written by the ingest service, each with the tenant of its device (none when unknown)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from iot_api.queries import TimeRange
from iot_api.repositories.sql import Query
from iot_api.schemas.rejects import Reject


class RejectRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def list(
        self,
        tenant_id: uuid.UUID,
        *,
        unattributed: bool,
        device_id: str | None,
        reason: str | None,
        received: TimeRange,
        after: tuple[Any, ...] | None,
        limit: int,
    ) -> list[Reject]:
        """The tenant's, newest first, after the position ``after`` (received_at, id); with
        ``unattributed``, also those of no tenant (no known device)."""
        query = Query(tenant_id)
        query.where("(tenant_id = $1 OR tenant_id IS NULL)" if unattributed else "tenant_id = $1")
        query.equals("device_id", device_id)
        query.equals("reason", reason)
        query.between("received_at", received.start, received.end)
        query.after(("received_at", "id"), after, descending=True)
        rows = await self.pool.fetch(
            f"""
            SELECT id, received_at, topic, device_id, reason, detail, payload, payload_size
            FROM ingest_rejects {query.sql()} ORDER BY received_at DESC, id DESC LIMIT {query.arg(limit)}
            """,
            *query.args,
        )
        return [Reject(**r) for r in rows]
