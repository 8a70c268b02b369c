"""The hub's bulk pub/sub reader, over a connection whose socket stream the test writes Redis's replies
into, byte for byte: many replies in one read, a reply cut anywhere between reads, confirmations, errors,
the idle PINGs and the reconnection when they go unanswered or Redis closes the connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

from aiohttp import web

from iot_common.auth import Principal
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_realtime.connection import Connection
from iot_realtime.hub import Hub, bulk_stream
from iot_realtime.protocol import WILDCARD
from tests.unit.test_realtime_hub import NAMES, TENANT, WAIT_S, FakeSocket, telemetry

Part = bytes | int


def resp(*items: Part) -> bytes:
    """One RESP2 array of bulk strings and integers, as Redis writes a pub/sub reply."""
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        out.append(b":%d\r\n" % item if isinstance(item, int) else b"$%d\r\n%s\r\n" % (len(item), item))
    return b"".join(out)


def push(*items: Part) -> bytes:
    """The same reply as RESP3 sends it (redis-py's default protocol): a push."""
    return b">" + resp(*items)[1:]


def message(device_id: str, data: bytes) -> bytes:
    return resp(b"message", NAMES.device_channel(TENANT, device_id).encode(), data)


class WireConnection:
    """What the reader takes from redis-py's connection: its socket's stream."""

    def __init__(self) -> None:
        self._reader = asyncio.StreamReader()
        self._writer = None


class WirePubSub:
    """A subscribed connection: commands are recorded, and Redis's answers go into the stream unless the
    test holds them back."""

    def __init__(self, server: WireServer) -> None:
        self.server = server
        self.connection = WireConnection()
        self.names: set[str] = set()
        self.pings = 0
        self.closed = False

    @property
    def stream(self) -> asyncio.StreamReader:
        return self.connection._reader

    def feed(self, data: bytes) -> None:
        self.stream.feed_data(data)

    async def _change(self, kind: bytes, names: tuple[str, ...], *, add: bool) -> None:
        for name in names:
            if add:
                self.names.add(name)
            else:
                self.names.discard(name)
            reply = resp(kind, name.encode(), len(self.names))
            if self.server.confirm:
                self.feed(reply)
            else:
                self.server.held.append(reply)
        self.server.changed()

    async def subscribe(self, *names: str) -> None:
        await self._change(b"subscribe", names, add=True)

    async def psubscribe(self, *names: str) -> None:
        await self._change(b"psubscribe", names, add=True)

    async def unsubscribe(self, *names: str) -> None:
        await self._change(b"unsubscribe", names, add=False)

    async def punsubscribe(self, *names: str) -> None:
        await self._change(b"punsubscribe", names, add=False)

    async def ping(self) -> None:
        self.pings += 1
        if self.server.answer_pings:
            self.feed(resp(b"pong", b""))
        self.server.changed()

    async def aclose(self) -> None:
        self.closed = True
        self.server.changed()


class WireServer:
    """The hub's Redis client: hands out :class:`WirePubSub` connections."""

    def __init__(self) -> None:
        self.pubsubs: list[WirePubSub] = []
        self.confirm = True
        self.held: list[bytes] = []
        self.answer_pings = True
        self._changed = asyncio.Event()

    def pubsub(self) -> WirePubSub:
        self.pubsubs.append(WirePubSub(self))
        self.changed()
        return self.pubsubs[-1]

    @property
    def current(self) -> WirePubSub:
        return self.pubsubs[-1]

    async def aclose(self) -> None:
        pass

    def changed(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class Wire:
    def __init__(self, hub: Hub, server: WireServer, stack: AsyncExitStack) -> None:
        self.hub = hub
        self.server = server
        self._stack = stack

    def connection(self) -> tuple[Connection, FakeSocket]:
        socket = FakeSocket()
        principal = Principal(
            subject="alice",
            kind="user",
            scopes=frozenset({"read"}),
            tenant_id=DEFAULT_TENANT_ID,
            role="viewer",
            permissions=frozenset({"read"}),
        )
        ws = cast(web.WebSocketResponse, socket)
        conn = Connection(ws, None, principal, tenant_id=TENANT, queue_size=10_000, close_timeout=1.0)
        conn.start()
        self._stack.push_async_callback(conn.close, 1000, "test over")
        return conn, socket

    async def client(self, *selectors: str) -> tuple[Connection, FakeSocket]:
        conn, socket = self.connection()
        for selector in selectors:
            conn.filters[selector] = None
        await self.hub.add(conn, selectors)
        return conn, socket


@asynccontextmanager
async def wired_hub(**options: float) -> AsyncIterator[Wire]:
    server = WireServer()
    hub = Hub("redis://unused.invalid:6379", NAMES, **options)
    hub._client = server  # type: ignore[assignment]
    listener = asyncio.create_task(hub.run())
    async with AsyncExitStack() as stack:
        try:
            await asyncio.wait_for(hub.connected.wait(), WAIT_S)
            yield Wire(hub, server, stack)
        finally:
            await stack.aclose()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await hub.close()


async def frames(socket: FakeSocket, n: int) -> list[dict[str, Any]]:
    return [await socket.next() for _ in range(n)]


def test_the_reader_takes_a_redis_py_stream_and_leaves_anything_else() -> None:
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        pubsub: Any = WirePubSub(WireServer())
        assert bulk_stream(pubsub) is pubsub.stream
        pubsub.connection._reader = None
        assert bulk_stream(pubsub) is None
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def test_every_reply_of_one_read_is_dispatched_in_order() -> None:
    async with wired_hub() as wire:
        _, one = await wire.client("d1")
        _, two = await wire.client("d2")
        _, every = await wire.client(WILDCARD)
        pattern = NAMES.tenant_device_pattern(TENANT).encode()
        chunk = b"".join(
            message(f"d{1 + n % 2}", telemetry(f"d{1 + n % 2}", n=float(n))) for n in range(200)
        ) + resp(b"pmessage", pattern, NAMES.device_channel(TENANT, "d3").encode(), telemetry("d3", n=-1.0))
        wire.server.current.feed(chunk)

        assert [f["metrics"]["n"] for f in await frames(one, 100)] == [float(n) for n in range(0, 200, 2)]
        assert [f["metrics"]["n"] for f in await frames(two, 100)] == [float(n) for n in range(1, 200, 2)]
        # A "*" client gets events from the pattern subscription only, not those of the device channels.
        assert (await every.next())["metrics"] == {"n": -1.0}


async def test_resp3_pushes_are_read_as_resp2_arrays_are() -> None:
    async with wired_hub() as wire:
        _, socket = await wire.client("d1")
        channel = NAMES.device_channel(TENANT, "d1").encode()
        wire.server.current.feed(
            b"+PONG\r\n"
            + push(b"message", channel, telemetry("d1", a=1.0))
            + push(b"unsubscribe", b"elsewhere", 1)
            + push(b"message", channel, telemetry("d1", b=2.0))
        )
        assert [f["metrics"] for f in await frames(socket, 2)] == [{"a": 1.0}, {"b": 2.0}]


async def test_a_reply_cut_anywhere_between_reads_is_dispatched_once_complete() -> None:
    async with wired_hub() as wire:
        _, socket = await wire.client("d1")
        data = message("d1", telemetry("d1", a=1.0)) + message("d1", telemetry("d1", b=2.0))
        for cut in (1, 5, 17, len(data) // 2, len(data) - 1):
            wire.server.current.feed(data[:cut])
            wire.server.current.feed(data[cut:])
            assert [f["metrics"] for f in await frames(socket, 2)] == [{"a": 1.0}, {"b": 2.0}]
        for byte in data:  # one byte per read
            wire.server.current.feed(bytes([byte]))
        assert [f["metrics"] for f in await frames(socket, 2)] == [{"a": 1.0}, {"b": 2.0}]


async def test_a_subscription_is_confirmed_by_redis_reply_and_ended_by_its_unsubscribe() -> None:
    async with wired_hub() as wire:
        name = NAMES.device_channel(TENANT, "d1")
        _, other = await wire.client("d2")
        wire.server.confirm = False
        conn, socket = wire.connection()
        conn.filters["d1"] = None
        adding = asyncio.create_task(wire.hub.add(conn, ["d1"]))
        await wire.server.until(lambda: wire.server.held != [])
        assert name not in wire.hub._listening
        assert not adding.done()

        for reply in wire.server.held:
            wire.server.current.feed(reply)
        await asyncio.wait_for(adding, WAIT_S)
        assert name in wire.hub._listening

        wire.server.current.feed(message("d1", telemetry("d1", x=1.0)))
        assert (await socket.next())["metrics"] == {"x": 1.0}
        wire.server.confirm = True
        del conn.filters["d1"]
        await wire.hub.remove(conn, ["d1"])
        # The reader handles replies in order: once a later event is through, so is the confirmation.
        wire.server.current.feed(message("d2", telemetry("d2", y=2.0)))
        assert (await other.next())["metrics"] == {"y": 2.0}
        assert name not in wire.hub._listening


async def test_an_error_reply_or_a_foreign_channel_leaves_the_reader_running() -> None:
    async with wired_hub() as wire:
        _, socket = await wire.client("d1")
        wire.server.current.feed(
            b"-ERR unknown command\r\n"
            + resp(b"message", b"someone-else:channel", b"{}")
            + message("d1", telemetry("d1", ok=1.0))
        )
        assert (await socket.next())["metrics"] == {"ok": 1.0}
        assert len(wire.server.pubsubs) == 1


async def test_an_idle_connection_is_pinged_and_kept_while_redis_answers() -> None:
    async with wired_hub(idle_ping_s=0.02) as wire:
        first = wire.server.current
        # Four idle intervals, each answered: three unanswered ones would have replaced the connection.
        await wire.server.until(lambda: first.pings >= 4)
        assert wire.server.pubsubs == [first]
        assert not first.closed


async def test_unanswered_pings_replace_the_connection_with_every_subscription_restored() -> None:
    async with wired_hub(idle_ping_s=0.02) as wire:
        _, socket = await wire.client("d1")
        first = wire.server.current
        wire.server.answer_pings = False
        await wire.server.until(lambda: first.closed and len(wire.server.pubsubs) == 2)
        assert first.pings == 2  # two pings, then the third silent interval gives up
        wire.server.answer_pings = True
        await asyncio.wait_for(wire.hub.connected.wait(), WAIT_S)
        assert NAMES.device_channel(TENANT, "d1") in wire.server.current.names

        wire.server.current.feed(message("d1", telemetry("d1", back=1.0)))
        assert (await socket.next())["metrics"] == {"back": 1.0}


async def test_a_connection_redis_closes_is_replaced() -> None:
    async with wired_hub() as wire:
        _, socket = await wire.client(WILDCARD)
        first = wire.server.current
        first.stream.feed_eof()
        await wire.server.until(lambda: first.closed and len(wire.server.pubsubs) == 2)
        await asyncio.wait_for(wire.hub.connected.wait(), WAIT_S)
        pattern = NAMES.tenant_device_pattern(TENANT)
        assert pattern in wire.server.current.names
        channel = NAMES.device_channel(TENANT, "d9").encode()
        wire.server.current.feed(resp(b"pmessage", pattern.encode(), channel, telemetry("d9", v=9.0)))
        assert (await socket.next())["metrics"] == {"v": 9.0}
