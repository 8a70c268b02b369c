"""Redis beside the database: a cache that never fails a request.

Every call goes through :class:`Cache`, which turns a Redis error or timeout into "no answer" (a miss, a
skipped write) and then leaves Redis alone for ``cooldown_s`` seconds, so an outage costs one failed
round trip per cooldown instead of one per request. Callers then read from PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter
from redis.exceptions import RedisError

from iot_common.redis_client import create_redis

T = TypeVar("T")
log = structlog.stdlib.get_logger("iot_api.cache")
REDIS_FAILURES = Counter("iot_api_redis_failures_total", "Redis calls that failed and fell back")
CACHE_LOOKUPS = Counter("iot_api_cache_lookups_total", "Cache lookups by result", ["result"])


def make_redis(url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    """A client whose calls give up quickly, so a hung Redis cannot hold a request."""
    return create_redis(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry_on_timeout=False,
    )


class Cache:
    """Redis calls that degrade: on failure they return ``default`` and Redis rests for a while."""

    def __init__(self, client: aioredis.Redis, namespace: str, cooldown_s: float = 1.0) -> None:
        self.client = client
        self.namespace = namespace
        self.cooldown_s = cooldown_s
        self._down_until = 0.0

    def key(self, *parts: str | int) -> str:
        """A key in this deployment's namespace (``IOT_API_CACHE_NAMESPACE``, else ``{prefix}:api:``)."""
        return self.namespace + ":".join(str(p) for p in parts)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def call(self, op: Callable[[aioredis.Redis], Awaitable[Any]], default: T) -> Any | T:
        """Run ``op`` on the client; on a Redis error return ``default``."""
        if not self.available:
            return default
        try:
            return await op(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            REDIS_FAILURES.inc()
            self._down_until = time.monotonic() + self.cooldown_s
            log.warning("redis unavailable, using the database", error=f"{type(exc).__name__}: {exc}")
            return default

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.call(lambda r: r.get(key), None)
        CACHE_LOOKUPS.labels("hit" if value is not None else "miss").inc()
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> bool:
        return bool(await self.call(lambda r: r.set(key, value, ex=ttl_s), False))

    async def delete(self, *keys: str) -> bool:
        """Delete ``keys``; False when Redis could not be reached (the entries may survive until TTL)."""
        result: int | None = await self.call(lambda r: r.delete(*keys), None)
        return result is not None

    async def incr(self, key: str) -> int | None:
        value: int | None = await self.call(lambda r: r.incr(key), None)
        return value

    async def pipeline(self, build: Callable[[Any], object]) -> list[Any] | None:
        """Run the commands ``build`` adds to a non-transactional pipeline; None on failure."""

        async def run(r: aioredis.Redis) -> list[Any] | None:
            pipe = r.pipeline(transaction=False)
            build(pipe)
            result: list[Any] = await pipe.execute()
            return result

        return await self.call(run, None)

    async def hgetall_many(self, keys: Sequence[str]) -> list[dict[bytes, bytes]] | None:
        result: list[dict[bytes, bytes]] | None = await self.pipeline(lambda p: [p.hgetall(k) for k in keys])
        return result
