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
import os
import socket
import uuid
from collections.abc import Iterable
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from iot_common.logging import get_logger
from iot_common.messages import AlertEvent, TelemetryEvent, decode_event, encode_event
from iot_common.resilience import Backoff
from iot_common.topics import RedisNames
from iot_realtime import metrics
from iot_realtime.connection import Connection, MetricFilter
from iot_realtime.protocol import WILDCARD

log = get_logger(__name__)
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0


def filter_event(data: bytes, wanted: frozenset[str]) -> bytes | None:
    """``data`` reduced to the ``wanted`` metrics, or None when nothing of it is wanted.

    Telemetry keeps only the wanted metrics; an alert passes when its metric is wanted; status and command
    events pass unchanged. An event that does not decode cannot be filtered and is not forwarded.
    """
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
        self._client = aioredis.from_url(
            redis_url,
            retry=Retry(NoBackoff(), 0),  # reconnects are ours: we restore subscriptions ourselves
            socket_connect_timeout=2.0,
            socket_timeout=10.0,  # a (un)subscribe to a Redis that stopped answering must not hang
            socket_keepalive=True,
        )
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
            if patterns:
                await pubsub.punsubscribe(*patterns)

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
            self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message" or kind == "pmessage":
            channel = message["channel"].decode()
            parsed = self._names.parse_device_channel(channel)
            if parsed is None:
                return
            metrics.MESSAGES_IN.inc()
            if kind == "message":
                conns = self._subs.get(channel)
            else:
                conns = self._wildcard.get(message["pattern"].decode())
            if conns:
                self.dispatch(parsed[1], message["data"], conns, wildcard=kind == "pmessage")
            return
        if kind == "subscribe" or kind == "psubscribe":
            name = message["channel"].decode()
            if name == self._control:
                self.connected.set()
            self._listening.add(name)
            for future in self._waiters.pop(name, ()):
                if not future.done():
                    future.set_result(None)
        elif kind == "unsubscribe" or kind == "punsubscribe":
            self._listening.discard(message["channel"].decode())

    def dispatch(self, device_id: str, data: bytes, conns: Iterable[Connection], *, wildcard: bool) -> None:
        """Queue ``data`` (an event of ``device_id``) for ``conns``, the local subscribers of the channel or
        pattern it came on; never waits for a client.

        A client subscribed to ``*`` gets each event once, from the pattern subscription, with the filter
        of its explicit subscription to that device if it has one, else that of ``*``.
        """
        filtered: dict[frozenset[str], bytes | None] = {}
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
                frame = filtered[wanted] = filter_event(data, wanted)
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
