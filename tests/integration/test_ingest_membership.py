"""The share group's membership scripts against a real Redis: who may leave, who is silent, who adopts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from iot_common.topics import RedisNames
from iot_ingest.membership import Membership


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def member(redis: aioredis.Redis, unique: str, name: str) -> Membership:
    return Membership(redis, RedisNames(f"t{unique}"), name, dead_after_s=5.0)


async def test_only_a_replica_with_a_live_peer_leaves(redis: aioredis.Redis, unique: str) -> None:
    a, b = member(redis, unique, "a"), member(redis, unique, "b")
    await a.beat()
    await b.beat()
    assert await a.leave() is True
    # b is now the last live member: it keeps its session.
    assert await b.leave() is False
    assert await redis.zrange(RedisNames(f"t{unique}").ingest_members, 0, -1) == [b"b"]


async def test_a_silent_peer_does_not_count_as_alive(redis: aioredis.Redis, unique: str) -> None:
    a = member(redis, unique, "a")
    await a.beat()
    # b's last heartbeat is a minute old.
    key = RedisNames(f"t{unique}").ingest_members
    now_s, now_us = await redis.time()
    await redis.zadd(key, {"b": now_s + now_us / 1e6 - 60})
    assert await a.silent_peers() == ["b"]
    assert await a.leave() is False


async def test_one_replica_claims_a_silent_peer_and_forgets_it_unless_it_is_back(
    redis: aioredis.Redis, unique: str
) -> None:
    a, c = member(redis, unique, "a"), member(redis, unique, "c")
    key = RedisNames(f"t{unique}").ingest_members
    now_s, now_us = await redis.time()
    await redis.zadd(key, {"b": now_s + now_us / 1e6 - 60})
    assert await a.claim("b", 10) is True
    assert await c.claim("b", 10) is False
    # b beats again before the adoption ends: it is back, so it stays a member.
    await member(redis, unique, "b").beat()
    assert await a.forget("b") is False
    assert await a.silent_peers() == []
    await redis.zadd(key, {"b": now_s + now_us / 1e6 - 60})
    assert await a.forget("b") is True
    assert await redis.zscore(key, "b") is None
