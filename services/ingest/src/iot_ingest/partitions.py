"""Telemetry partition maintenance, a periodic job of every ingest replica (at start-up, then hourly).

:func:`iot_common.db.partitions.maintain_partitions` (also run by ``iot-migrate``) creates the missing
daily partitions and drops those past retention, under an advisory lock: one replica works at a time.
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg

from iot_common.db.partitions import maintain_partitions

INTERVAL_S: Final = 3600.0


async def maintain(pool: asyncpg.Pool[Any], *, retention_days: int, ahead_days: int) -> None:
    """One run of the job; raises when PostgreSQL fails (the next run tries again)."""
    async with pool.acquire() as conn:
        await maintain_partitions(conn, retention_days=retention_days, ahead_days=ahead_days)
