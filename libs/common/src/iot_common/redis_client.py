"""Redis clients from ``IOT_REDIS_URL``: one server (``redis://``, ``rediss://``, the default) or a Redis
Cluster (``redis+cluster://host:port,host:port/`` or ``rediss+cluster://...``: the seed nodes, any of the
cluster's; the client learns the slot map from them and follows it).

A cluster client answers the same commands as a single-server one (pipelines are split per node, a Lua
script goes to the node owning its key), so the services hold either as :class:`redis.asyncio.Redis`. Two
things differ and are the callers' business (see docs/scaling.md, "Redis Cluster"): the keys of one
script or transaction must share a hash slot, and device events use sharded pub/sub (``SPUBLISH`` and
``SSUBSCRIBE``) instead of ``PUBLISH``, which a cluster would copy to every node.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Sequence
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from iot_common.state import STATE_COPY_SCRIPT
from iot_common.topics import RedisNames

CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")
_CLUSTER_OPTIONS: Final = frozenset(inspect.signature(RedisCluster.__init__).parameters) - {"self"}


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes (host, port) of a cluster URL; raises ValueError for a URL without any."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    nodes = []
    for part in netloc.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not part.strip():
            continue
        if not sep:
            host, port = part.strip(), "6379"
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError("a redis+cluster:// URL names at least one host:port")
    return nodes


def create_redis(url: str, **options: Any) -> aioredis.Redis:
    """A client of ``url`` (one server, or a cluster for ``redis+cluster://``) with the connection
    ``options`` of :func:`redis.asyncio.from_url` (timeouts, retry, keepalive, ...)."""
    if not is_cluster_url(url):
        return aioredis.from_url(url, **options)
    return cast(aioredis.Redis, create_cluster(url, **options))


def create_cluster(url: str, **options: Any) -> RedisCluster:
    """A :class:`RedisCluster` client of a ``redis+cluster://`` URL."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    username, _, password = credentials.partition(":")
    # Single-server options that a cluster client does not take (``retry_on_timeout``: a cluster client
    # retries by its ``retry``; ``db``: a cluster has database 0 only).
    options = {k: v for k, v in options.items() if k in _CLUSTER_OPTIONS}
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes(url)],
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=parts.scheme == "rediss+cluster",
        **options,
    )


def as_cluster(client: aioredis.Redis) -> RedisCluster | None:
    """The client as a :class:`RedisCluster` when it is one (made by :func:`create_redis`), else None."""
    held: object = client
    return held if isinstance(held, RedisCluster) else None


PUBLISH_CONCURRENCY: Final = 64
"""Sharded publications in flight at once (a cluster client pipelines no ``SPUBLISH``)."""

DeviceEventOut = tuple["str | uuid.UUID", str, bytes]
"""An encoded device event to publish: (tenant id, device id, bytes)."""


async def spublish_device_events(
    cluster: RedisCluster, names: RedisNames, events: Sequence[DeviceEventOut]
) -> None:
    """Redis Cluster mode: ``SPUBLISH`` each event on its device's channel and on its tenant's channel (for
    the ``"*"`` subscribers), each on the shard owning that channel, a bounded number at a time. Events of
    one device keep their order (a device's channel is one shard, and each round waits for the previous)."""
    pending = list(events)
    # A device's events must reach its channels in order: a round holds at most one event per device (its
    # two publications), and waits for the previous round.
    while pending:
        round_: list[DeviceEventOut] = []
        rest: list[DeviceEventOut] = []
        seen: set[str] = set()
        for event in pending:
            if event[1] in seen or len(round_) >= PUBLISH_CONCURRENCY:
                rest.append(event)
            else:
                seen.add(event[1])
                round_.append(event)
        calls = []
        for tenant_id, device_id, data in round_:
            calls.append(cluster.spublish(names.device_channel(tenant_id, device_id), data))
            calls.append(cluster.spublish(names.tenant_channel(tenant_id), data))
        await asyncio.gather(*calls)
        pending = rest


async def publish_device_events(
    client: aioredis.Redis, names: RedisNames, events: Sequence[DeviceEventOut]
) -> None:
    """Publish device events: ``PUBLISH`` on the device channels (one pipeline) on one server,
    :func:`spublish_device_events` on a cluster."""
    if not events:
        return
    cluster = as_cluster(client)
    if cluster is not None:
        await spublish_device_events(cluster, names, events)
        return
    async with client.pipeline(transaction=False) as pipe:
        for tenant_id, device_id, data in events:
            pipe.publish(names.device_channel(tenant_id, device_id), data)
        await pipe.execute()


def pubsub_client(url: str, node: tuple[str, int] | None = None, **options: Any) -> aioredis.Redis:
    """A client for pub/sub on one server: the server of ``url``; on a cluster, ``node`` (host, port), else
    its first seed node (classic ``PUBLISH`` reaches every node of a cluster, so any node serves the
    low-volume control channels)."""
    if not is_cluster_url(url):
        return aioredis.from_url(url, **options)
    parts = urlsplit(url)
    username, _, password = parts.netloc.rpartition("@")[0].partition(":")
    host, port = node if node is not None else cluster_nodes(url)[0]
    for name in ("db", "single_connection_client"):
        options.pop(name, None)
    return aioredis.Redis(
        host=host,
        port=port,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=parts.scheme == "rediss+cluster",
        **options,
    )


async def copy_state(
    client: aioredis.Redis, names: RedisNames, tenant_id: str, device_id: str, version: int, event: bytes
) -> bool:
    """Keep the Redis copy of a device's state and publish its ``state`` event, unless the copy already
    holds this version or a newer one (:data:`iot_common.state.STATE_COPY_SCRIPT`); whether it was newer.
    On a cluster the script (one key, one shard) publishes nothing and the event goes by sharded pub/sub."""
    key = names.state_key(device_id)
    cluster = as_cluster(client)
    if cluster is None:
        channel = names.device_channel(tenant_id, device_id)
        return bool(await client.eval(STATE_COPY_SCRIPT, 1, key, str(version), event, channel))
    if not await cluster.eval(STATE_COPY_SCRIPT, 1, key, str(version), event, ""):
        return False
    await spublish_device_events(cluster, names, [(tenant_id, device_id, event)])
    return True
