"""Command expiry, a periodic job of every ingest replica: commands past ``expires_at`` become ``expired``.

:func:`iot_common.commands.expire_commands` lets one replica at a time take each command; the events of
the expired commands are then published on the device channels.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions
import structlog

from iot_common.commands import expire_commands
from iot_common.messages import encode_event
from iot_common.redis_client import publish_device_events
from iot_common.topics import RedisNames
from iot_ingest import metrics

log = structlog.stdlib.get_logger(__name__)


async def expire_due_commands(pool: asyncpg.Pool[Any], redis: aioredis.Redis, names: RedisNames) -> None:
    """One run of the job. Raises when PostgreSQL fails (the next run tries again); a failure to publish
    the events is only logged, the commands are expired either way."""
    async with pool.acquire() as conn:
        events = await expire_commands(conn)
    if not events:
        return
    metrics.COMMANDS_EXPIRED.inc(len(events))
    log.info("commands expired", count=len(events), command_ids=[e.id for _, e in events][:20])
    try:
        out = [(tenant_id, event.device_id, encode_event(event)) for tenant_id, event in events]
        await publish_device_events(redis, names, out)
    except (redis_exceptions.RedisError, OSError) as exc:
        log.warning("publishing expired commands failed", error=str(exc))
