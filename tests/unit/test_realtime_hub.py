"""The realtime hub's contract, over Redis pub/sub faked in memory and real connections on fake sockets:
which channels it holds on Redis, which sockets get which events, that a slow client stalls nobody else,
and that a lost or silent Redis connection is replaced with every subscription restored."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import pytest
from aiohttp import WSMsgType, web
from redis.exceptions import ConnectionError as RedisConnectionError

from iot_common.auth import Principal
from iot_common.messages import AlertEvent, MetricValue, StatusEvent, TelemetryEvent, encode_event
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_realtime.connection import Connection, EventFilter, MetricFilter
from iot_realtime.hub import Hub
from iot_realtime.protocol import CLOSE_TOO_SLOW, WILDCARD

NAMES = RedisNames("unit")
TENANT = str(DEFAULT_TENANT_ID)
OTHER = "7d3f0a9e-2b1c-4e5f-8a6b-9c0d1e2f3a4b"
WAIT_S = 10.0  # only ever the limit of a wait for an event: nothing here is timed


class FakePubSub:
    """One pub/sub connection: what it is subscribed to, and the messages Redis pushed to it."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.channels: set[str] = set()
        self.patterns: set[str] = set()
        self.inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None: the connection broke
        self.broken = False
        self.silent = False

    @property
    def live(self) -> bool:
        return not (self.broken or self.silent)

    def push(self, kind: str, channel: str | None, data: Any = None, pattern: str | None = None) -> None:
        self.inbox.put_nowait(
            {
                "type": kind,
                "pattern": pattern.encode() if pattern else None,
                "channel": channel.encode() if channel is not None else None,
                "data": data,
            }
        )

    def _command(self) -> bool:
        """Whether a command reaches Redis: raises on a broken connection, False on a silent one."""
        if self.broken or self.server.down:
            raise RedisConnectionError("connection lost")
        return not self.silent

    async def _change(self, names: tuple[str, ...], held: set[str], kind: str, *, add: bool) -> None:
        if not self._command():
            return
        for name in names:
            if add:
                held.add(name)
            else:
                held.discard(name)
            self.push(kind, name, len(self.channels) + len(self.patterns))
        self.server.changed()

    async def subscribe(self, *channels: str) -> None:
        await self._change(channels, self.channels, "subscribe", add=True)

    async def unsubscribe(self, *channels: str) -> None:
        await self._change(channels, self.channels, "unsubscribe", add=False)

    async def psubscribe(self, *patterns: str) -> None:
        await self._change(patterns, self.patterns, "psubscribe", add=True)

    async def punsubscribe(self, *patterns: str) -> None:
        await self._change(patterns, self.patterns, "punsubscribe", add=False)

    async def ping(self) -> None:
        if self._command():
            self.push("pong", None, b"")

    async def get_message(self, ignore_subscribe_messages: bool = False, timeout: float = 0.0) -> Any:
        self._command()
        try:
            message = await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return None
        if message is None:
            raise RedisConnectionError("connection lost")
        return message

    async def aclose(self) -> None:
        if self in self.server.pubsubs:
            self.server.pubsubs.remove(self)
        self.server.changed()


class FakeRedis:
    """Redis pub/sub in memory, as the hub's client sees it; ``publish`` is another process publishing."""

    def __init__(self) -> None:
        self.pubsubs: list[FakePubSub] = []
        self.opened = 0
        self.down = False
        self._changed = asyncio.Event()

    def pubsub(self) -> FakePubSub:
        pubsub = FakePubSub(self)
        self.pubsubs.append(pubsub)
        self.opened += 1
        self.changed()
        return pubsub

    async def aclose(self) -> None:
        pass

    def publish(self, channel: str, data: bytes) -> int:
        """Deliver ``data`` as Redis does; the number of subscriptions that got it."""
        receivers = 0
        for pubsub in self.pubsubs:
            if not pubsub.live:
                continue
            if channel in pubsub.channels:
                pubsub.push("message", channel, data)
                receivers += 1
            for pattern in pubsub.patterns:
                if fnmatch.fnmatchcase(channel, pattern):
                    pubsub.push("pmessage", channel, data, pattern)
                    receivers += 1
        return receivers

    def subscribed(self) -> set[str]:
        """The device channels and patterns held by live connections."""
        names = set()
        for pubsub in self.pubsubs:
            if pubsub.live:
                names |= pubsub.channels | pubsub.patterns
        return {n for n in names if n.startswith(f"{NAMES.prefix}:tenant:")}

    def break_connections(self) -> None:
        """The server goes away: every connection breaks and new ones fail until :meth:`come_back`."""
        self.down = True
        for pubsub in self.pubsubs:
            pubsub.broken = True
            pubsub.inbox.put_nowait(None)

    def come_back(self) -> None:
        self.down = False
        self.changed()

    def silence_connections(self) -> None:
        """The open connections go silent (a half-open TCP connection): nothing in, nothing out."""
        for pubsub in self.pubsubs:
            pubsub.silent = True
        self.changed()

    def changed(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class FakeSocket:
    """The WebSocket under a :class:`Connection`: the frames written, and the close; a stalled one never
    finishes writing a frame (a client that stopped reading)."""

    def __init__(self, stalled: bool = False) -> None:
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.stalled = stalled
        self.close_code: int | None = None
        self.closed = asyncio.Event()

    async def send_frame(self, message: bytes, opcode: WSMsgType) -> None:
        if self.stalled:
            await asyncio.Event().wait()
        self.frames.put_nowait(msgspec.json.decode(message))

    async def close(self, *, code: int, message: bytes, drain: bool) -> bool:
        self.close_code = code
        self.closed.set()
        return True

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.get(), WAIT_S)


def telemetry(device_id: str, **metrics: MetricValue) -> bytes:
    return encode_event(TelemetryEvent(device_id=device_id, ts=datetime.now(UTC), metrics=metrics))


def status(device_id: str) -> bytes:
    return encode_event(StatusEvent(device_id=device_id, status="online", ts=datetime.now(UTC)))


class Harness:
    """A running hub on a :class:`FakeRedis`, and clients that subscribe through it as the gateway does."""

    def __init__(self, hub: Hub, server: FakeRedis, stack: AsyncExitStack) -> None:
        self.hub = hub
        self.server = server
        self._stack = stack

    async def client(
        self,
        *selectors: str,
        metrics: MetricFilter = None,
        queue_size: int = 100,
        stalled: bool = False,
        tenant: str = TENANT,
    ) -> tuple[Connection, FakeSocket]:
        socket = FakeSocket(stalled)
        principal = Principal(
            subject="alice",
            kind="user",
            scopes=frozenset({"read"}),
            tenant_id=DEFAULT_TENANT_ID,
            role="viewer",
            permissions=frozenset({"read"}),
        )
        ws = cast(web.WebSocketResponse, socket)
        conn = Connection(ws, None, principal, tenant_id=tenant, queue_size=queue_size, close_timeout=1.0)
        conn.start()
        self._stack.push_async_callback(conn.close, 1000, "test over")
        await self.subscribe(conn, *selectors, metrics=metrics)
        return conn, socket

    async def subscribe(self, conn: Connection, *selectors: str, metrics: MetricFilter = None) -> None:
        for selector in selectors:
            conn.filters[selector] = metrics
        await self.hub.add(conn, selectors)

    async def unsubscribe(self, conn: Connection, *selectors: str) -> None:
        for selector in selectors:
            del conn.filters[selector]
        await self.hub.remove(conn, selectors)

    def publish(self, device_id: str, data: bytes, tenant: str = TENANT) -> int:
        return self.server.publish(NAMES.device_channel(tenant, device_id), data)


@asynccontextmanager
async def running_hub(**options: float) -> AsyncIterator[Harness]:
    server = FakeRedis()
    hub = Hub("redis://unused.invalid:6379", NAMES, **options)
    hub._client = server  # type: ignore[assignment]  # its one way to Redis
    listener = asyncio.create_task(hub.run())
    async with AsyncExitStack() as stack:
        try:
            await asyncio.wait_for(hub.connected.wait(), WAIT_S)
            yield Harness(hub, server, stack)
        finally:
            await stack.aclose()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await hub.close()


@pytest.fixture
async def hub() -> AsyncIterator[Harness]:
    async with running_hub() as harness:
        yield harness


def channel(device_id: str, tenant: str = TENANT) -> str:
    return NAMES.device_channel(tenant, device_id)


async def test_a_device_channel_is_held_while_a_local_client_wants_it(hub: Harness) -> None:
    assert hub.server.subscribed() == set()
    first, first_socket = await hub.client("d1")
    # add() returns once Redis confirmed: the next event is delivered.
    assert hub.server.subscribed() == {channel("d1")}
    assert hub.publish("d1", telemetry("d1", t=1.0)) == 1
    assert (await first_socket.next())["metrics"] == {"t": 1.0}

    second, _ = await hub.client("d1", "d2")
    assert hub.server.subscribed() == {channel("d1"), channel("d2")}

    await hub.unsubscribe(first, "d1")
    assert hub.server.subscribed() == {channel("d1"), channel("d2")}  # the second client still wants d1
    await hub.unsubscribe(second, "d1")
    assert hub.server.subscribed() == {channel("d2")}
    await hub.unsubscribe(second, "d2")
    assert hub.server.subscribed() == set()


async def test_each_event_reaches_every_subscriber_of_its_device_and_no_one_else(hub: Harness) -> None:
    a, a_socket = await hub.client("d1", "marker-a")
    _, b_socket = await hub.client("d1", "d2")
    _, c_socket = await hub.client("d2")

    hub.publish("d1", telemetry("d1", t=1.0))
    hub.publish("d2", telemetry("d2", t=2.0))
    assert (await a_socket.next())["device_id"] == "d1"
    assert [(await b_socket.next())["device_id"] for _ in range(2)] == ["d1", "d2"]
    assert (await c_socket.next())["device_id"] == "d2"

    await hub.unsubscribe(a, "d1")
    hub.publish("d1", telemetry("d1", t=3.0))
    hub.publish("marker-a", status("marker-a"))
    assert (await b_socket.next())["metrics"] == {"t": 3.0}
    assert (await a_socket.next())["device_id"] == "marker-a"  # nothing of d1 came before it


async def test_a_metric_filter_narrows_telemetry_and_alerts_but_not_status(hub: Harness) -> None:
    _, narrow = await hub.client("d1", metrics=EventFilter(frozenset({"temperature"})))
    _, full = await hub.client("d1")

    hub.publish("d1", telemetry("d1", temperature=21.5, humidity=40.0))
    hub.publish("d1", telemetry("d1", humidity=41.0))  # nothing the narrow client wants
    hub.publish("d1", status("d1"))
    assert (await narrow.next())["metrics"] == {"temperature": 21.5}
    assert (await narrow.next())["type"] == "status"
    assert (await full.next())["metrics"] == {"temperature": 21.5, "humidity": 40.0}
    assert (await full.next())["metrics"] == {"humidity": 41.0}
    assert (await full.next())["type"] == "status"


async def test_a_type_filter_on_the_wildcard_sends_alerts_without_telemetry(hub: Harness) -> None:
    """The tenant's alerts and status changes, and everything of the one device the client also chose."""
    conn, socket = await hub.client(WILDCARD, metrics=EventFilter(types=frozenset({"alert", "status"})))
    await hub.subscribe(conn, "d1")
    alert = encode_event(
        AlertEvent("a", "r", "d2", "temperature", "critical", "open", "hot", 91.0, 90.0, datetime.now(UTC))
    )
    hub.publish("d2", telemetry("d2", temperature=50.0))
    hub.publish("d2", alert)
    hub.publish("d3", status("d3"))
    hub.publish("d1", telemetry("d1", temperature=20.0))
    frames = [await socket.next() for _ in range(3)]
    assert [(f["type"], f["device_id"]) for f in frames] == [
        ("alert", "d2"),
        ("status", "d3"),
        ("telemetry", "d1"),
    ]


async def test_wildcard_clients_share_one_pattern_and_get_each_event_once(hub: Harness) -> None:
    everything, everything_socket = await hub.client(WILDCARD)
    mixed, mixed_socket = await hub.client(WILDCARD)
    await hub.subscribe(mixed, "d1", metrics=EventFilter(frozenset({"temperature"})))
    pattern = NAMES.tenant_device_pattern(TENANT)
    assert hub.server.subscribed() == {pattern, channel("d1")}

    # Redis delivers d1's event twice (channel and pattern); the mixed client gets it once, with the
    # filter of its explicit subscription to d1, and everything else unfiltered.
    assert hub.publish("d1", telemetry("d1", temperature=20.0, humidity=50.0)) == 2
    hub.publish("d2", telemetry("d2", temperature=19.0, humidity=55.0))
    hub.server.publish(RedisNames("elsewhere").device_channel(TENANT, "d3"), telemetry("d3", temperature=0.0))
    hub.publish("d4", status("d4"))
    to_everything = [await everything_socket.next() for _ in range(3)]
    to_mixed = [await mixed_socket.next() for _ in range(3)]
    assert [f["device_id"] for f in to_everything] == ["d1", "d2", "d4"]  # d1 once, nothing of d3
    assert [f["device_id"] for f in to_mixed] == ["d1", "d2", "d4"]
    assert to_everything[0]["metrics"] == {"temperature": 20.0, "humidity": 50.0}
    assert to_mixed[0]["metrics"] == {"temperature": 20.0}
    assert to_mixed[1:] == to_everything[1:]

    await hub.unsubscribe(everything, WILDCARD)
    assert hub.server.subscribed() == {pattern, channel("d1")}  # the mixed client still holds *
    await hub.unsubscribe(mixed, WILDCARD)
    assert hub.server.subscribed() == {channel("d1")}


async def test_a_client_sees_the_events_of_its_own_tenant_only(hub: Harness) -> None:
    _, ours = await hub.client(WILDCARD, "shared-id")
    _, theirs = await hub.client(WILDCARD, "shared-id", tenant=OTHER)
    assert hub.server.subscribed() == {
        NAMES.tenant_device_pattern(TENANT),
        NAMES.tenant_device_pattern(OTHER),
        channel("shared-id"),
        channel("shared-id", OTHER),
    }
    # The same device id in both tenants (as a device moved between them would be): each event reaches
    # the clients of the tenant it was published in, and only those.
    hub.publish("shared-id", telemetry("shared-id", ours=1.0))
    hub.publish("shared-id", telemetry("shared-id", theirs=1.0), tenant=OTHER)
    hub.publish("d-other", status("d-other"), tenant=OTHER)
    hub.publish("marker", status("marker"))
    assert [(await ours.next())["device_id"] for _ in range(2)] == ["shared-id", "marker"]
    frames = [await theirs.next() for _ in range(2)]
    assert [(f["device_id"], f.get("metrics")) for f in frames] == [
        ("shared-id", {"theirs": 1.0}),
        ("d-other", None),
    ]


async def test_a_client_that_stops_reading_is_dropped_and_delays_no_one(hub: Harness) -> None:
    slow, slow_socket = await hub.client("d1", queue_size=4, stalled=True)
    _, other_socket = await hub.client("d1")

    # A burst of 10: the slow client's writer holds the first, its queue the next 4; the 6th drops it.
    for value in range(10):
        hub.publish("d1", telemetry("d1", n=float(value)))
    assert [(await other_socket.next())["metrics"]["n"] for _ in range(10)] == [float(n) for n in range(10)]
    await asyncio.wait_for(slow_socket.closed.wait(), WAIT_S)
    assert (slow.dropped, slow_socket.close_code) == (True, CLOSE_TOO_SLOW)

    hub.publish("d1", telemetry("d1", n=10.0))
    assert (await other_socket.next())["metrics"] == {"n": 10.0}


async def test_subscriptions_are_restored_on_a_new_connection_after_redis_comes_back() -> None:
    async with running_hub(confirm_timeout=0.2) as hub:
        _, device_socket = await hub.client("d1")
        _, wildcard_socket = await hub.client(WILDCARD)
        before = hub.server.subscribed()
        assert before == {channel("d1"), NAMES.tenant_device_pattern(TENANT)}

        hub.server.break_connections()
        await hub.server.until(lambda: not hub.server.pubsubs)  # the hub closed the broken connection
        assert not hub.hub.connected.is_set()
        assert hub.publish("d1", telemetry("d1", lost=1.0)) == 0  # pub/sub keeps nothing for the absent
        # Subscribing while Redis is away: add() stops waiting for Redis after confirm_timeout, and the
        # subscription is made when Redis is back.
        _, late_socket = await hub.client("d2")

        hub.server.come_back()
        await asyncio.wait_for(hub.hub.connected.wait(), WAIT_S)
        await hub.server.until(lambda: hub.server.subscribed() == before | {channel("d2")})
        assert hub.server.opened >= 2

        hub.publish("d1", telemetry("d1", back=1.0))
        hub.publish("d2", telemetry("d2", late=1.0))
        assert (await device_socket.next())["metrics"] == {"back": 1.0}
        assert [(await wildcard_socket.next())["metrics"] for _ in range(2)] == [{"back": 1.0}, {"late": 1.0}]
        assert (await late_socket.next())["metrics"] == {"late": 1.0}


async def test_a_silent_connection_is_noticed_by_unanswered_pings_and_replaced() -> None:
    async with running_hub(idle_ping_s=0.05) as hub:
        _, socket = await hub.client("d1")
        first = hub.server.pubsubs[0]
        hub.server.silence_connections()
        # Three pings without an answer: the hub gives that connection up and opens another.
        await hub.server.until(lambda: first not in hub.server.pubsubs and hub.server.subscribed() != set())
        assert hub.server.subscribed() == {channel("d1")}
        await asyncio.wait_for(hub.hub.connected.wait(), WAIT_S)

        hub.publish("d1", telemetry("d1", t=5.0))
        assert (await socket.next())["metrics"] == {"t": 5.0}
