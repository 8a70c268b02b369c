"""Redis Cluster mode end to end: a private 3-master cluster of the machine's redis-server (7.x),
``iot-ingest`` and two ``iot-realtime`` replicas on it (``IOT_REDIS_URL=redis+cluster://...``), a private
Mosquitto and real WebSocket clients.

Readings of devices whose channels hash to each of the three shards reach the clients of both replicas,
by explicit subscription and by ``"*"``; each replica holds each device channel on the shard that owns it
(sharded pub/sub, checked with ``PUBSUB SHARDCHANNELS`` on every node) and no device channel by classic
pub/sub; and
the latest values ingest wrote (a Lua script per device hash) come back in the ``latest`` frames. When a
device channel's slot moves to another master, the replicas subscribe again on the new owner and its
readings keep reaching them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from iot_common.redis_client import create_cluster
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_testkit.loadgen import publish_async, telemetry_payload
from iot_testkit.processes import (
    RedisClusterServer,
    ServiceProcess,
    Start,
    free_port,
    mosquitto,
    private_redis_cluster,
)
from iot_testkit.waiting import wait_for

from .realtime_support import Realtime, open_ws, start_realtime, subscribe, token

TENANT = str(DEFAULT_TENANT_ID)

# One worker runs this module under pytest-xdist (make test), so its cluster (module scope) starts once.
pytestmark = pytest.mark.xdist_group("e2e-redis-cluster")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    with private_redis_cluster(3) as server:
        yield server


@pytest.fixture
def broker() -> Iterator[str]:
    with mosquitto() as url:
        yield url


def start_ingest(
    service: Start, database_url: str, redis_url: str, mqtt_url: str, unique: str, prefix: str
) -> ServiceProcess:
    port = free_port()
    proc = service(
        "iot-ingest",
        {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_REDIS_PREFIX": prefix,
            "IOT_MQTT_URL": mqtt_url,
            "IOT_MQTT_SHARE_GROUP": f"cluster-{unique}",
            "IOT_MQTT_CLIENT_ID": f"cluster-{unique}",
            "IOT_INGEST_HTTP_PORT": str(port),
            "IOT_INGEST_BATCH_DELAY_MS": "20",
        },
    )
    proc.wait_http(f"http://127.0.0.1:{port}/readyz")
    return proc


async def devices_on_every_shard(
    cluster_url: str, names: RedisNames, unique: str, per_shard: int
) -> dict[str, list[str]]:
    """Device ids whose channels hash to each master: node name -> ``per_shard`` ids."""
    client = create_cluster(cluster_url)
    try:
        await client.initialize()
        by_node: dict[str, list[str]] = {n.name: [] for n in client.get_primaries()}
        n = 0
        while any(len(ids) < per_shard for ids in by_node.values()):
            device_id = f"cl-{unique}-{n}"
            node = client.get_node_from_key(names.device_channel(TENANT, device_id))
            assert node is not None
            if len(by_node[node.name]) < per_shard:
                by_node[node.name].append(device_id)
            n += 1
        return by_node
    finally:
        await client.aclose()


class Watcher:
    """A WebSocket client recording the (device, seq) of every telemetry frame it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: set[tuple[str, int]] = set()
        self.latest: dict[str, dict[str, Any]] = {}
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame["type"] == "telemetry":
                    self.seen.add((frame["device_id"], int(frame["metrics"]["seq"])))

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def watching(replica: Realtime, selectors: list[str]) -> AsyncIterator[Watcher]:
    async with open_ws(replica.url(token())) as ws:
        frames = await subscribe(ws, 1, selectors)
        assert frames[-1] == {"type": "ack", "id": 1}, frames
        watcher = Watcher(ws)
        try:
            yield watcher
        finally:
            await watcher.close()


async def shard_channels(cluster: RedisClusterServer) -> dict[int, set[str]]:
    """Port of each node -> the sharded channels with a subscriber there (``PUBSUB SHARDCHANNELS``)."""
    out: dict[int, set[str]] = {}
    for port in cluster.ports:
        node = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            channels = await node.execute_command("PUBSUB", "SHARDCHANNELS")
            out[port] = {c.decode() for c in channels}
        finally:
            await node.aclose()
    return out


async def device_on_an_empty_slot(cluster: RedisClusterServer, names: RedisNames, devices: list[str]) -> str:
    """One of ``devices`` whose channel's slot holds no key (so it can move without migrating keys)."""
    client = create_cluster(cluster.url)
    try:
        await client.initialize()
        for device_id in devices:
            channel = names.device_channel(TENANT, device_id)
            node = client.get_node_from_key(channel)
            assert node is not None
            owner = aioredis.Redis(host=node.host, port=int(node.port))
            try:
                keys = await owner.execute_command("CLUSTER", "COUNTKEYSINSLOT", client.keyslot(channel))
            finally:
                await owner.aclose()
            if int(keys) == 0:
                return device_id
        raise AssertionError("every slot holds keys")
    finally:
        await client.aclose()


async def move_slot(cluster: RedisClusterServer, channel: str) -> int:
    """Move the (empty) slot of ``channel`` to another master, as ``redis-cli --cluster reshard`` does;
    returns the new owner's port."""
    client = create_cluster(cluster.url)
    nodes = {port: aioredis.Redis(host="127.0.0.1", port=port) for port in cluster.ports}
    try:
        await client.initialize()
        slot = client.keyslot(channel)
        source_node = client.get_node_from_key(channel)
        assert source_node is not None
        source = int(source_node.port)
        target = next(p for p in cluster.ports if p != source)
        ids = {port: (await node.execute_command("CLUSTER", "MYID")).decode() for port, node in nodes.items()}
        await nodes[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        await nodes[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        for port in [target, source, *(p for p in cluster.ports if p not in (target, source))]:
            await nodes[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        return target
    finally:
        await client.aclose()
        for node in nodes.values():
            await node.aclose()


@pytest.mark.timeout(180)
async def test_readings_of_devices_on_all_three_shards_reach_clients_of_two_replicas(
    service: Start,
    database_url: str,
    db: asyncpg.Connection[Any],
    cluster: RedisClusterServer,
    broker: str,
    unique: str,
) -> None:
    prefix = f"cl{unique[:10]}"
    names = RedisNames(prefix)
    by_node = await devices_on_every_shard(cluster.url, names, unique, per_shard=2)
    assert len(by_node) == 3
    devices = [d for ids in by_node.values() for d in ids]
    await db.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", devices)
    env = {"IOT_REDIS_PREFIX": prefix}
    replicas = [start_realtime(service, database_url, cluster.url, env) for _ in range(2)]
    start_ingest(service, database_url, cluster.url, broker, unique, prefix)

    async with (
        watching(replicas[0], devices) as explicit_0,
        watching(replicas[1], devices[::2]) as explicit_1,
        watching(replicas[1], ["*"]) as everything_1,
        watching(replicas[0], ["*"]) as everything_0,
    ):
        # Each device channel is held on the shard that owns it, by sharded pub/sub only.
        held = await shard_channels(cluster)
        for name, ids in by_node.items():
            port = int(name.rsplit(":", 1)[1])
            assert {names.device_channel(TENANT, d) for d in ids} <= held[port], (name, held[port])
        tenant_channel = names.tenant_channel(TENANT)
        assert sum(tenant_channel in channels for channels in held.values()) == 1
        for port in cluster.ports:
            node = aioredis.Redis(host="127.0.0.1", port=port)
            try:
                assert await node.execute_command("PUBSUB", "NUMPAT") == 0
                # Classic channels are only ingest's low-volume control channels (rules, alert notes).
                classic = await node.execute_command("PUBSUB", "CHANNELS", f"{prefix}:tenant:*")
                assert classic == []
            finally:
                await node.aclose()

        messages = 5 * len(devices)
        result = await publish_async(broker, devices, messages, base_ms=int(time.time() * 1000))
        assert result.acked == messages
        expected = {(devices[seq % len(devices)], seq) for seq in range(messages)}

        async def all_seen() -> bool:
            return all(
                w.seen >= want
                for w, want in (
                    (explicit_0, expected),
                    (everything_0, expected),
                    (everything_1, expected),
                    (explicit_1, {e for e in expected if e[0] in devices[::2]}),
                )
            )

        await wait_for(all_seen, 30, "every reading on both replicas")
        assert {d for d, _ in explicit_1.seen} == set(devices[::2])
        assert everything_1.seen == expected
        assert explicit_0.seen == expected

        # A slot moves to another master (as in a resharding): Redis ends its channels' subscriptions, the
        # replicas read the slot map again and subscribe on the new owner; readings go on reaching them.
        moved = await device_on_an_empty_slot(cluster, names, devices[::2])
        channel = names.device_channel(TENANT, moved)
        target = await move_slot(cluster, channel)

        async def resubscribed() -> bool:
            node = aioredis.Redis(host="127.0.0.1", port=target)
            try:
                counts = await node.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            finally:
                await node.aclose()
            return int(counts[1]) == 2  # replica 0 (explicit) and replica 1 (explicit)

        await wait_for(resubscribed, 30, f"both replicas subscribed to {channel} on its new shard")

        def later(seq: int, base_ms: int) -> bytes:
            return telemetry_payload(seq + 1000, base_ms)

        result = await publish_async(broker, [moved], 5, base_ms=int(time.time() * 1000), payload=later)
        assert result.acked == 5
        after = {(moved, 1000 + n) for n in range(5)}

        async def seen_after() -> bool:
            return all(w.seen >= after for w in (explicit_0, explicit_1, everything_0, everything_1))

        await wait_for(seen_after, 30, "readings of the moved channel on both replicas")
        expected |= after

    # The latest values ingest wrote on each shard come back on subscribe.
    async with open_ws(replicas[1].url(token())) as ws:
        frames = await subscribe(ws, 2, devices)
        latest = {f["device_id"]: f["metrics"] for f in frames if f["type"] == "latest"}
        assert set(latest) == set(devices)
        last_seq = {d: max(s for dd, s in expected if dd == d) for d in devices}
        assert {d: int(m["seq"]["value"]) for d, m in latest.items()} == last_seq
