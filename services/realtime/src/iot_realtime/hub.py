"""Fan-out from Redis pub/sub to the connections of this process.

One Redis pub/sub connection per process. Ingest and the API publish each device's events on a channel of
the device's tenant, ``{prefix}:tenant:{tenant_id}:device:{device_id}``. A connection acts in one tenant,
and its subscriptions name channels of that tenant only: a device channel is subscribed when its first
local subscriber arrives and unsubscribed when the last one leaves; the ``*`` subscribers of one tenant
share one ``PSUBSCRIBE {prefix}:tenant:{tenant_id}:device:*``. So an event of another tenant never reaches
a connection: Redis does not route it to this process unless a client of that tenant asked for it, and
then only to that client's entry (``IOT_REDIS_PREFIX`` keeps another deployment on the same Redis server
out the same way). Each replica listens only to what its own clients need. When the Redis connection
breaks, the listener reconnects with backoff and subscribes again to everything its clients hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterable
from typing import Any, Final

import hiredis
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from iot_common.logging import get_logger
from iot_common.messages import AlertEvent, TelemetryEvent, decode_event, encode_event
from iot_common.redis_client import as_cluster, create_redis, pubsub_client
from iot_common.resilience import Backoff
from iot_common.topics import RedisNames
from iot_realtime import metrics
from iot_realtime.connection import Connection, EventFilter, MetricFilter
from iot_realtime.protocol import WILDCARD

log = get_logger(__name__)
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0
_CLIENT_OPTIONS: Final[dict[str, Any]] = {
    "retry": Retry(NoBackoff(), 0),  # reconnects are ours: we restore subscriptions ourselves
    "socket_connect_timeout": 2.0,
    "socket_timeout": 10.0,  # a (un)subscribe to a Redis that stopped answering must not hang
    "socket_keepalive": True,
}


READ_SIZE: Final = 1 << 18
"""Bytes read from the pub/sub socket at once: a burst of messages is parsed and dispatched in one go."""
_CHANNEL_CACHE_MAX: Final = 100_000
"""Channel names remembered decoded (device channels seen); past this the cache starts over."""

Reply = list[Any]
"""A pub/sub reply as Redis sends it: ``[b"message", channel, data]``, ``[b"subscribe", name, count]``...
(an array in RESP2, a push in RESP3: both parse to a list)."""


def bulk_stream(pubsub: PubSub) -> asyncio.StreamReader | None:
    """The socket stream of ``pubsub``'s connection when the listener can read it in bulk, else None.

    redis-py parses one reply per ``await`` and arms a timeout for each: at thousands of messages a second
    that is most of this process's CPU. Once subscribed, the connection carries nothing but pub/sub
    replies, which only the listener reads; redis-py still connects, authenticates and sends the
    (un)subscribe commands and PINGs on it. None (the caller falls back to ``get_message``) when the
    connection is not a stream of redis-py's asyncio connection, or when redis-py's parser holds bytes it
    read ahead (never seen: nothing is pushed before the first subscription, whose reply nobody read).
    """
    conn = getattr(pubsub, "connection", None)
    stream = getattr(conn, "_reader", None)
    if not isinstance(stream, asyncio.StreamReader):
        return None
    parser = getattr(getattr(conn, "_parser", None), "_reader", None)
    if isinstance(parser, hiredis.Reader) and parser.has_data():
        return None
    return stream


class _Liveness:
    """The idle check of one subscribed connection, on a timer of its own (no timeout per read): each
    ``interval`` without a byte from Redis sends a PING; the third silent interval in a row declares the
    connection dead and ends its stream, so the listener's read returns and it reconnects."""

    def __init__(self, interval: float, pubsub: PubSub, stream: asyncio.StreamReader) -> None:
        self.seen = False
        """Set by the listener on each read; cleared by each tick."""
        self.dead = False
        self._interval = interval
        self._pubsub = pubsub
        self._stream = stream
        self._unanswered = 0
        self._loop = asyncio.get_running_loop()
        self._pings: set[asyncio.Task[Any]] = set()
        self._timer = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        if self.seen:
            self.seen = False
            self._unanswered = 0
        else:
            self._unanswered += 1
            if self._unanswered > 2:
                self._kill()
                return
            # A silent network loss would otherwise go unseen: the answer (or anything else) counts.
            ping = self._loop.create_task(self._ping())
            self._pings.add(ping)
            ping.add_done_callback(self._pings.discard)
        self._timer = self._loop.call_later(self._interval, self._tick)

    async def _ping(self) -> None:
        try:
            await self._pubsub.ping()
        except (RedisError, OSError) as exc:
            log.debug("redis pub/sub ping failed", error=str(exc))
            self._kill()

    def _kill(self) -> None:
        self.dead = True
        transport = getattr(getattr(self._pubsub.connection, "_writer", None), "transport", None)
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        self._stream.feed_eof()

    def cancel(self) -> None:
        self._timer.cancel()
        for ping in self._pings:
            ping.cancel()


def as_reply(message: dict[str, Any]) -> Reply:
    """A message parsed by redis-py's ``get_message`` back in the shape Redis sent it."""
    kind = message["type"].encode()
    if kind == b"pmessage":
        return [kind, message["pattern"], message["channel"], message["data"]]
    return [kind, message["channel"], message["data"]]


def forget_unsubscribed(pubsub: PubSub, kind: str, names: Iterable[str]) -> None:
    """Drop ``names`` from redis-py's own record of ``pubsub``'s subscriptions right after the
    unsubscribe command went out.

    redis-py clears that record when its ``get_message`` sees the confirmation, which the bulk listener
    reads itself: without this the record would keep every channel ever unsubscribed on the connection.
    """
    held = getattr(pubsub, kind, None)
    pending = getattr(pubsub, f"pending_unsubscribe_{kind}", None)
    if not isinstance(held, dict) or not isinstance(pending, set):
        return
    for name in names:
        key = name.encode()
        held.pop(key, None)
        pending.discard(key)


class _TypeOf(msgspec.Struct):
    type: str


_type_decoder = msgspec.json.Decoder(_TypeOf)


def filter_event(
    data: bytes, wanted: frozenset[str] | None, types: frozenset[str] | None = None
) -> bytes | None:
    """``data`` reduced to the ``wanted`` metrics and ``types`` of events, or None when nothing of it is
    wanted (None: no limit).

    An event whose type is not in ``types`` is dropped. Telemetry keeps only the wanted metrics; an alert
    passes when its metric is wanted; status and command events pass unchanged. An event that does not
    decode cannot be filtered and is not forwarded.
    """
    if types is not None:
        try:
            kind = _type_decoder.decode(data).type
        except msgspec.MsgspecError:
            return None
        if kind not in types:
            return None
    if wanted is None:
        return data
    try:
        event = decode_event(data)
    except msgspec.MsgspecError:
        return None
    if isinstance(event, TelemetryEvent):
        kept = {name: value for name, value in event.metrics.items() if name in wanted}
        if not kept:
            return None
        if len(kept) == len(event.metrics):
            return data
        return encode_event(msgspec.structs.replace(event, metrics=kept))
    if isinstance(event, AlertEvent) and event.metric not in wanted:
        return None
    return data


class Hub:
    """Local subscription registry plus the Redis pub/sub listener that feeds it."""

    def __init__(
        self, redis_url: str, names: RedisNames, *, confirm_timeout: float = 5.0, idle_ping_s: float = 10.0
    ) -> None:
        self._url = redis_url
        self._client = self._make_client()
        self._names = names
        self._subs: dict[str, set[Connection]] = {}
        """Device channel -> the local connections subscribed to it."""
        self._wildcard: dict[str, set[Connection]] = {}
        """A tenant's pattern -> the local connections subscribed to ``*`` in that tenant."""
        # A private channel of this process, so its pub/sub connection is never idle of subscriptions (and
        # can be pinged) even with no clients.
        control = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._control = names.realtime_control_prefix + control
        self._pubsub: PubSub | None = None
        self._requested: set[str] = set()
        self._listening: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()
        self._confirm_timeout = confirm_timeout
        self._idle_ping_s = idle_ping_s
        self.connected = asyncio.Event()
        self._channels: dict[bytes, tuple[str, str | None]] = {}
        """Channel (or pattern) as Redis sends it -> (its name, the device id of a device channel of this
        deployment, else None): decoded and parsed once, not per message."""
        self._received = 0
        """Device events read and not yet counted in the metric (counted once per read)."""

    def _make_client(self) -> aioredis.Redis:
        return aioredis.from_url(self._url, **_CLIENT_OPTIONS)

    def _channel(self, raw: bytes) -> tuple[str, str | None]:
        known = self._channels.get(raw)
        if known is None:
            if len(self._channels) >= _CHANNEL_CACHE_MAX:
                self._channels.clear()
            name = raw.decode()
            parsed = self._names.parse_device_channel(name)
            known = self._channels[raw] = (name, parsed[1] if parsed is not None else None)
        return known

    # -- subscriptions -------------------------------------------------------------------------------

    def _name(self, conn: Connection, selector: str) -> str:
        """The Redis channel (or pattern, for ``*``) of ``selector`` in the connection's tenant."""
        if selector == WILDCARD:
            return self._names.tenant_device_pattern(conn.tenant_id)
        return self._names.device_channel(conn.tenant_id, selector)

    async def add(self, conn: Connection, selectors: Iterable[str]) -> None:
        """Deliver events of ``selectors`` (device ids or ``*``, in the connection's tenant) to ``conn``.

        Returns once Redis confirmed the subscriptions, or after a timeout while Redis is unreachable:
        the subscriptions are kept and restored when it comes back.
        """
        names = []
        for selector in selectors:
            name = self._name(conn, selector)
            held = self._wildcard if selector == WILDCARD else self._subs
            held.setdefault(name, set()).add(conn)
            names.append(name)
        await self._sync(names)
        waiters = [self._waiter(name) for name in names if name not in self._listening]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=self._confirm_timeout)
            for future in pending:
                future.cancel()

    async def remove(self, conn: Connection, selectors: Iterable[str]) -> None:
        """Stop delivering ``selectors`` to ``conn``; a channel nobody here needs is unsubscribed."""
        names = []
        for selector in selectors:
            name = self._name(conn, selector)
            held = self._wildcard if selector == WILDCARD else self._subs
            conns = held.get(name)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del held[name]
                names.append(name)
        await self._sync(names)

    def _wants(self, name: str) -> bool:
        return name in self._subs or name in self._wildcard

    def _waiter(self, name: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, []).append(future)
        return future

    async def _sync(self, names: list[str]) -> None:
        """Bring the Redis subscriptions of ``names`` in line with what local clients need."""
        async with self._lock:
            pubsub = self._pubsub
            if pubsub is None:
                return  # the listener subscribes to everything needed when it reconnects
            add = [n for n in dict.fromkeys(names) if self._wants(n) and n not in self._requested]
            drop = [n for n in dict.fromkeys(names) if not self._wants(n) and n in self._requested]
            try:
                await self._command(pubsub, add, subscribe=True)
                await self._command(pubsub, drop, subscribe=False)
            except (RedisError, OSError) as exc:
                log.warning("redis subscription change failed", error=str(exc))
                return
            self._requested.update(add)
            self._requested.difference_update(drop)
            metrics.REDIS_CHANNELS.set(len(self._requested))

    async def _command(self, pubsub: PubSub, names: list[str], *, subscribe: bool) -> None:
        # Device ids never hold "*": only the tenants' patterns end with it.
        channels = [n for n in names if not n.endswith("*")]
        patterns = [n for n in names if n.endswith("*")]
        if subscribe:
            if channels:
                await pubsub.subscribe(*channels)
            if patterns:
                await pubsub.psubscribe(*patterns)
        else:
            if channels:
                await pubsub.unsubscribe(*channels)
                forget_unsubscribed(pubsub, "channels", channels)
            if patterns:
                await pubsub.punsubscribe(*patterns)
                forget_unsubscribed(pubsub, "patterns", patterns)

    # -- listener ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Listen until cancelled, reconnecting (with backoff) and resubscribing after each failure."""
        backoff = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S)
        failed = False
        while True:
            pubsub = self._client.pubsub()
            try:
                async with self._lock:
                    await pubsub.subscribe(self._control)
                    wanted = [*self._subs, *self._wildcard]
                    await self._command(pubsub, wanted, subscribe=True)
                    self._pubsub = pubsub
                    self._requested = set(wanted)
                    metrics.REDIS_CHANNELS.set(len(wanted))
                if failed:
                    metrics.REDIS_RECONNECTS.inc()
                    log.info("redis pub/sub reconnected", channels=len(wanted))
                backoff.reset()
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                if not failed or self.connected.is_set():
                    log.warning("redis pub/sub connection lost", error=str(exc))
                failed = True
            except Exception:
                # Whatever else breaks, the listener must come back, or this replica goes silent.
                log.exception("redis pub/sub listener failed")
                failed = True
            finally:
                self._pubsub = None
                self._requested.clear()
                self._listening.clear()
                self.connected.clear()
                await self._close_pubsub(pubsub)
            await asyncio.sleep(backoff.next())

    async def _listen(self, pubsub: PubSub) -> None:
        """Read ``pubsub``'s replies until its connection fails; raises what ended it."""
        stream = bulk_stream(pubsub)
        if stream is None:
            await self._listen_per_message(pubsub)
            return
        liveness = _Liveness(self._idle_ping_s, pubsub, stream)
        reader = hiredis.Reader()
        read, feed, gets, handle = stream.read, reader.feed, reader.gets, self._reply
        try:
            while True:
                chunk = await read(READ_SIZE)
                if not chunk:
                    if liveness.dead:
                        raise ConnectionError("redis did not answer pings")
                    raise ConnectionError("redis closed the pub/sub connection")
                liveness.seen = True
                feed(chunk)
                # Every complete reply of the chunk, without an await in between (a reply cut at the
                # chunk's end stays in the reader until the next chunk completes it).
                reply = gets()
                while reply is not False:
                    # An array: RESP2's, or RESP3's push (redis-py's default protocol), a list too.
                    if isinstance(reply, list):
                        handle(reply)
                    else:
                        self._other(reply)
                    reply = gets()
                self._count()
        finally:
            liveness.cancel()

    async def _listen_per_message(self, pubsub: PubSub) -> None:
        """The listener over redis-py's ``get_message`` (a connection :func:`bulk_stream` cannot read)."""
        unanswered = 0
        while True:
            message = await pubsub.get_message(timeout=self._idle_ping_s)
            if message is None:
                # Idle: make sure Redis is still there (a silent network loss would otherwise go unseen).
                unanswered += 1
                if unanswered > 2:
                    raise ConnectionError("redis did not answer pings")
                await pubsub.ping()
                continue
            unanswered = 0
            if message["type"] != "pong":
                self._reply(as_reply(message))
                self._count()

    @staticmethod
    def _other(reply: Any) -> None:
        """A reply that is not an array: a PONG (RESP3), or an error."""
        if isinstance(reply, Exception):
            log.warning("redis refused a pub/sub command", error=str(reply))

    def _count(self) -> None:
        if self._received:
            metrics.MESSAGES_IN.inc(self._received)
            self._received = 0

    def _reply(self, reply: Reply) -> None:
        """Route one pub/sub reply: an event to the local subscribers, a confirmation to its waiters."""
        kind = reply[0]
        if kind == b"message":
            name, device_id = self._channel(reply[1])
            if device_id is None:
                return
            self._received += 1
            conns = self._subs.get(name)
            if conns:
                self.dispatch(device_id, reply[2], conns, wildcard=False)
            return
        if kind == b"pmessage":
            _, device_id = self._channel(reply[2])
            if device_id is None:
                return
            self._received += 1
            conns = self._wildcard.get(self._channel(reply[1])[0])
            if conns:
                self.dispatch(device_id, reply[3], conns, wildcard=True)
            return
        if kind == b"subscribe" or kind == b"psubscribe":
            name = reply[1].decode()
            if name == self._control:
                self.connected.set()
            self._confirm(name)
        elif kind == b"unsubscribe" or kind == b"punsubscribe":
            self._listening.discard(reply[1].decode())

    def _confirm(self, name: str) -> None:
        self._listening.add(name)
        for future in self._waiters.pop(name, ()):
            if not future.done():
                future.set_result(None)

    def dispatch(self, device_id: str, data: bytes, conns: Iterable[Connection], *, wildcard: bool) -> None:
        """Queue ``data`` (an event of ``device_id``) for ``conns``, the local subscribers of the channel or
        pattern it came on; never waits for a client.

        A client subscribed to ``*`` gets each event once, from the pattern subscription, with the filter
        of its explicit subscription to that device if it has one, else that of ``*``.
        """
        filtered: dict[EventFilter, bytes | None] = {}
        for conn in conns:
            wanted: MetricFilter
            if wildcard:
                wanted = conn.filters.get(device_id, conn.filters.get(WILDCARD))
            elif WILDCARD in conn.filters:
                continue
            else:
                wanted = conn.filters.get(device_id)
            if wanted is None:
                conn.send(data)
                continue
            if wanted in filtered:
                frame = filtered[wanted]
            else:
                frame = filtered[wanted] = filter_event(data, wanted.metrics, wanted.types)
            if frame is not None:
                conn.send(frame)

    async def close(self) -> None:
        await self._client.aclose()

    @staticmethod
    async def _close_pubsub(pubsub: PubSub) -> None:
        try:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            log.debug("closing pub/sub connection failed", error=str(exc))


class _DeviceOf(msgspec.Struct):
    device_id: str


_device_of = msgspec.json.Decoder(_DeviceOf)


class ShardedHub(Hub):
    """The hub on a Redis Cluster (``IOT_REDIS_URL=redis+cluster://...``): sharded pub/sub.

    Classic pub/sub on a cluster copies every ``PUBLISH`` to every node, so its cost grows with the
    cluster instead of spreading over it. Here each device channel is ``SSUBSCRIBE``d on the shard that
    owns its hash slot (publishers ``SPUBLISH`` there), through one pub/sub connection per master node.
    Sharded pub/sub has no patterns: a tenant's ``"*"`` subscribers ``SSUBSCRIBE`` the tenant's channel
    (``{prefix}:tenant:{tenant_id}:devices``), on which publishers put every event of the tenant's devices
    too (the cost: two publications per event in cluster mode, and each tenant's ``"*"`` traffic on one
    shard). Each connection also holds a private control channel hashed to its node, so it always has a
    subscription and can be pinged. When a node's connection fails, the slot map changes (a failover, a
    slot migration: Redis then ends the moved channels' subscriptions with ``sunsubscribe``), or a channel
    lands on a node we hold no connection to, every connection is replaced after a fresh look at the slot
    map, and every subscription restored (events published meanwhile are not replayed: clients that need
    them resume with ``since``).
    """

    def __init__(
        self, redis_url: str, names: RedisNames, *, confirm_timeout: float = 5.0, idle_ping_s: float = 10.0
    ) -> None:
        super().__init__(redis_url, names, confirm_timeout=confirm_timeout, idle_ping_s=idle_ping_s)
        self._nodes: dict[str, PubSub] = {}
        """Master node name (host:port) -> this process's pub/sub connection to it."""
        self._controls: dict[str, str] = {}
        """Master node name -> the control channel held on it."""
        self._confirmed: set[str] = set()
        self._resync = asyncio.Event()

    def _make_client(self) -> aioredis.Redis:
        return create_redis(self._url, **_CLIENT_OPTIONS)

    @property
    def _cluster(self) -> RedisCluster:
        cluster = as_cluster(self._client)
        assert cluster is not None
        return cluster

    def _name(self, conn: Connection, selector: str) -> str:
        if selector == WILDCARD:
            return self._names.tenant_channel(conn.tenant_id)
        return self._names.device_channel(conn.tenant_id, selector)

    async def _sync(self, names: list[str]) -> None:
        async with self._lock:
            if not self._nodes:
                return  # the listener subscribes to everything needed when it reconnects
            add = [n for n in dict.fromkeys(names) if self._wants(n) and n not in self._requested]
            drop = [n for n in dict.fromkeys(names) if not self._wants(n) and n in self._requested]
            try:
                await self._route(add, subscribe=True)
                await self._route(drop, subscribe=False)
            except (RedisError, OSError) as exc:
                log.warning("redis sharded subscription change failed, resynchronising", error=str(exc))
                self._resync.set()
                return
            self._requested.update(add)
            self._requested.difference_update(drop)
            metrics.REDIS_CHANNELS.set(len(self._requested))

    async def _route(self, names: list[str], *, subscribe: bool) -> None:
        """(Un)subscribe each channel on the node owning its slot (one channel per command: a multi-channel
        ``SSUBSCRIBE`` must stay within one slot)."""
        for name in names:
            node = self._cluster.get_node_from_key(name)
            pubsub = self._nodes.get(node.name) if node is not None else None
            if pubsub is None:
                raise ConnectionError(f"no connection to the node owning {name}: the slot map changed")
            if subscribe:
                await pubsub.ssubscribe(name)
            else:
                await pubsub.sunsubscribe(name)
                forget_unsubscribed(pubsub, "shard_channels", [name])

    def _control_for(self, node_name: str) -> str:
        """A control channel of this process whose slot the node ``node_name`` owns."""
        for n in range(100_000):
            name = f"{self._control}:{{{n}}}"
            node = self._cluster.get_node_from_key(name)
            if node is not None and node.name == node_name:
                return name
        raise ConnectionError(f"node {node_name} owns no slot")

    async def run(self) -> None:
        backoff = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S)
        failed = False
        while True:
            tasks: list[asyncio.Task[None]] = []
            try:
                async with self._lock:
                    await self._cluster.initialize()
                    await self._cluster.nodes_manager.initialize()  # a fresh slot map
                    self._resync.clear()
                    self._confirmed.clear()
                    for node in self._cluster.get_primaries():
                        client = pubsub_client(self._url, (node.host, int(node.port)), **_CLIENT_OPTIONS)
                        self._nodes[node.name] = client.pubsub()
                    self._controls = {name: self._control_for(name) for name in self._nodes}
                    for name, pubsub in self._nodes.items():
                        await pubsub.ssubscribe(self._controls[name])
                    wanted = [*self._subs, *self._wildcard]
                    await self._route(wanted, subscribe=True)
                    self._requested = set(wanted)
                    metrics.REDIS_CHANNELS.set(len(wanted))
                if failed:
                    metrics.REDIS_RECONNECTS.inc()
                    log.info(
                        "redis sharded pub/sub reconnected", channels=len(wanted), nodes=len(self._nodes)
                    )
                backoff.reset()
                tasks = [asyncio.create_task(self._listen(p)) for p in self._nodes.values()]
                tasks.append(asyncio.create_task(self._resync.wait()))  # type: ignore[arg-type]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what ended a listener
                raise ConnectionError("resynchronising with the cluster's slot map")
            except (RedisError, RedisClusterException, OSError) as exc:
                if not failed or self.connected.is_set():
                    log.warning("redis sharded pub/sub connection lost", error=str(exc))
                failed = True
            except Exception:
                log.exception("redis sharded pub/sub listener failed")
                failed = True
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                nodes, self._nodes = self._nodes, {}
                self._requested.clear()
                self._listening.clear()
                self.connected.clear()
                for pubsub in nodes.values():
                    await self._close_pubsub(pubsub)
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.connection_pool.disconnect()
            await asyncio.sleep(backoff.next())

    def _reply(self, reply: Reply) -> None:
        kind = reply[0]
        if kind == b"smessage":
            name, device_id = self._channel(reply[1])
            data = reply[2]
            self._received += 1
            conns = self._subs.get(name)
            if conns:
                if device_id is not None:
                    self.dispatch(device_id, data, conns, wildcard=False)
                return
            conns = self._wildcard.get(name)
            if conns:
                try:
                    device_id = _device_of.decode(data).device_id
                except msgspec.MsgspecError:
                    return
                self.dispatch(device_id, data, conns, wildcard=True)
            return
        if kind == b"ssubscribe":
            name = reply[1].decode()
            if name in self._controls.values():
                self._confirmed.add(name)
                if len(self._confirmed) == len(self._controls):
                    self.connected.set()
            self._confirm(name)
        elif kind == b"sunsubscribe":
            name = reply[1].decode()
            self._listening.discard(name)
            if name in self._controls.values() or (self._wants(name) and name in self._requested):
                # Not asked for: Redis ended it because its slot moved to another node.
                raise ConnectionError(f"redis ended the subscription of {name}: its slot moved")
