"""Dead letters written by the ingest service."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from iot_api.schemas import Reject


class RejectRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def list(
        self,
        *,
        device_id: str | None,
        reason: str | None,
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, int] | None,
        limit: int,
    ) -> list[Reject]:
        """Newest first, after the position ``after`` (received_at, id)."""
        clauses: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if device_id is not None:
            clauses.append(f"device_id = {arg(device_id)}")
        if reason is not None:
            clauses.append(f"reason = {arg(reason)}")
        if start is not None:
            clauses.append(f"received_at >= {arg(start)}")
        if end is not None:
            clauses.append(f"received_at < {arg(end)}")
        if after is not None:
            clauses.append(f"(received_at, id) < ({arg(after[0])}, {arg(after[1])})")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.pool.fetch(
            f"""
            SELECT id, received_at, topic, device_id, reason, detail, payload, payload_size
            FROM ingest_rejects {where} ORDER BY received_at DESC, id DESC LIMIT {arg(limit)}
            """,
            *args,
        )
        return [
            Reject(
                id=r["id"],
                received_at=r["received_at"],
                topic=r["topic"],
                device_id=r["device_id"],
                reason=r["reason"],
                detail=r["detail"],
                payload=r["payload"],
                payload_size=r["payload_size"],
            )
            for r in rows
        ]
