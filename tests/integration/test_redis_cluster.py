"""The Redis users of the API and ingest on a Redis Cluster (a private 3 masters of the machine's
redis-server 7.x, ``redis+cluster://``): keys spread over the shards, so every multi-key operation must
be split per shard (pipelines) or kept within one slot (scripts), and device events go by sharded pub/sub.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from iot_api.cache import Cache, make_redis
from iot_api.events import EventPublisher
from iot_api.limits import FailureLimiter
from iot_common.messages import LatestValue, Reading, StatusEvent, TelemetryEvent, decode_event
from iot_common.redis_client import as_cluster, create_redis, pubsub_client
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_ingest.plan import Plan
from iot_ingest.redis_output import RedisOutput
from iot_testkit.processes import RedisClusterServer, private_redis_cluster
from iot_testkit.waiting import wait_for

TENANT = str(DEFAULT_TENANT_ID)

# One worker runs this module under pytest-xdist (make test), so its cluster (module scope) starts once.
pytestmark = pytest.mark.xdist_group("integration-redis-cluster")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    with private_redis_cluster(3) as server:
        yield server


@pytest.fixture
async def client(cluster: RedisClusterServer) -> AsyncIterator[aioredis.Redis]:
    redis = create_redis(cluster.url, socket_timeout=5)
    try:
        yield redis
    finally:
        await redis.aclose()


def the_cluster(client: aioredis.Redis) -> RedisCluster:
    cluster = as_cluster(client)
    assert cluster is not None
    return cluster


async def spread(client: aioredis.Redis, make: Any, per_shard: int = 2) -> list[str]:
    """Names ``make(n)`` for n = 0, 1, ... until each of the 3 masters owns ``per_shard`` of them."""
    cluster = the_cluster(client)
    await cluster.initialize()
    by_node: dict[str, list[str]] = {n.name: [] for n in cluster.get_primaries()}
    n = 0
    while any(len(v) < per_shard for v in by_node.values()):
        name = make(n)
        node = cluster.get_node_from_key(name)
        assert node is not None
        if len(by_node[node.name]) < per_shard:
            by_node[node.name].append(name)
        n += 1
    assert len(by_node) == 3
    return [name for names in by_node.values() for name in names]


class ShardListener:
    """``SSUBSCRIBE`` of channels, each on the node owning it; collects (channel, event) pairs."""

    def __init__(self, url: str, cluster: RedisCluster) -> None:
        self.url = url
        self.cluster = cluster
        self.got: list[tuple[str, Any]] = []
        self._pubsubs: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def subscribe(self, channels: list[str]) -> None:
        """Subscribe, wait for every confirmation, then start reading (a pub/sub connection is not to be
        read and written concurrently)."""
        counts: dict[str, int] = {}
        for channel in channels:
            node = self.cluster.get_node_from_key(channel)
            assert node is not None
            pubsub = self._pubsubs.get(node.name)
            if pubsub is None:
                pubsub = pubsub_client(self.url, (node.host, int(node.port))).pubsub()
                self._pubsubs[node.name] = pubsub
            await pubsub.ssubscribe(channel)
            counts[node.name] = counts.get(node.name, 0) + 1
        for name, pubsub in self._pubsubs.items():
            for _ in range(counts.get(name, 0)):
                message = await pubsub.get_message(timeout=5.0)
                assert message is not None
                assert message["type"] == "ssubscribe", message
            self._tasks.append(asyncio.create_task(self._read(pubsub)))

    async def _read(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "smessage":
                self.got.append((message["channel"].decode(), decode_event(message["data"])))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pubsub in self._pubsubs.values():
            await pubsub.aclose()


async def test_api_cache_pipelines_and_failure_counters_span_the_shards(
    cluster: RedisClusterServer, unique: str
) -> None:
    redis = make_redis(cluster.url, timeout_s=5)
    try:
        cache = Cache(redis, f"api{unique}:")
        keys = await spread(redis, lambda n: cache.key("device", n))
        assert await cache.pipeline(lambda p: [p.set(k, k.encode(), ex=60) for k in keys]) is not None
        assert [await cache.get(k) for k in keys] == [k.encode() for k in keys]
        fetched = await cache.pipeline(lambda p: [p.get(k) for k in keys])
        assert fetched == [k.encode() for k in keys]
        assert await cache.delete(*keys)
        assert [await cache.get(k) for k in keys] == [None] * len(keys)
        # The API's failure counters (login and key attempts): several subjects, keys on every shard.
        limiter = FailureLimiter(cache)
        subjects = [("login", f"user-{n}-{unique}", 3) for n in range(12)]
        assert await limiter.record(subjects) == [1] * 12
        await limiter.check(subjects)  # under the limit: no refusal
        assert await limiter.record(subjects) == [2] * 12
        assert await limiter.record(subjects) == [3] * 12
        with pytest.raises(Exception, match=r"(?i)too many|limit"):
            await limiter.check(subjects[5:6])
    finally:
        await redis.aclose()


async def test_ingest_latest_values_and_events_on_a_cluster(
    cluster: RedisClusterServer, client: aioredis.Redis, unique: str
) -> None:
    names = RedisNames(f"in{unique[:10]}")
    devices = await spread(client, lambda n: names.device_channel(TENANT, f"d{n}-{unique}"))
    device_ids = [names.parse_device_channel(c)[1] for c in devices]  # type: ignore[index]
    listener = ShardListener(cluster.url, the_cluster(client))
    await listener.subscribe([*devices, names.tenant_channel(TENANT)])
    output = RedisOutput(client, names)
    t0 = datetime.now(UTC).replace(microsecond=0)
    try:
        newer = Plan(
            readings=[Reading(d, t0 + timedelta(seconds=2), {"t": 2.0}) for d in device_ids],
            statuses={d: ("online", t0) for d in device_ids},
            tenants=dict.fromkeys(device_ids, TENANT),
        )
        older = Plan(
            readings=[Reading(d, t0 + timedelta(seconds=1), {"t": 1.0, "h": 5.0}) for d in device_ids],
            tenants=dict.fromkeys(device_ids, TENANT),
        )
        await output.submit(newer)
        await output.submit(older)
        await output.drain()
        decoder = msgspec.json.Decoder(LatestValue)
        for device_id in device_ids:
            stored = await client.hgetall(names.latest_key(device_id))
            # The newer value stays; the older reading's other metric is still written.
            assert decoder.decode(stored[b"t"]).value == 2.0
            assert decoder.decode(stored[b"h"]).value == 5.0

        def per_channel(channel: str) -> list[Any]:
            return [event for c, event in listener.got if c == channel]

        async def all_published() -> bool:
            return len(listener.got) == 2 * 3 * len(device_ids)

        await wait_for(
            all_published,
            10,
            "each event on its device channel and its tenant channel",
            detail=lambda: f"got {len(listener.got)}: {listener.got}",
        )
        for channel, device_id in zip(devices, device_ids, strict=True):
            # In order per device: the first plan's reading and status, then the second's reading.
            assert per_channel(channel) == [
                TelemetryEvent(device_id, t0 + timedelta(seconds=2), {"t": 2.0}),
                StatusEvent(device_id, "online", t0),
                TelemetryEvent(device_id, t0 + timedelta(seconds=1), {"t": 1.0, "h": 5.0}),
            ]
            on_tenant = [e for e in per_channel(names.tenant_channel(TENANT)) if e.device_id == device_id]
            assert on_tenant == per_channel(channel)
    finally:
        await listener.close()


async def test_api_device_events_are_published_on_the_shards(
    cluster: RedisClusterServer, client: aioredis.Redis, unique: str
) -> None:
    names = RedisNames(f"ap{unique[:10]}")
    channels = await spread(client, lambda n: names.device_channel(TENANT, f"a{n}-{unique}"), per_shard=1)
    listener = ShardListener(cluster.url, the_cluster(client))
    await listener.subscribe(channels)
    try:
        publisher = EventPublisher(Cache(client, f"api{unique}:"), names)
        at = datetime.now(UTC)
        for channel in channels:
            device_id = names.parse_device_channel(channel)[1]  # type: ignore[index]
            assert await publisher.device_event(TENANT, device_id, StatusEvent(device_id, "offline", at))

        async def all_published() -> bool:
            return {c for c, _ in listener.got} == set(channels)

        await wait_for(all_published, 10, "an event on each shard's device channel")
    finally:
        await listener.close()
