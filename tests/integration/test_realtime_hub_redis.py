"""The realtime hub's bulk pub/sub reader on a real redis-server (a private one per test): a burst
published at once reaches every subscriber in order, a password or ACL user in the URL works, and the hub
comes back with its subscriptions after Redis restarts or stops answering."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import cast

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from iot_common.auth import Principal
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_realtime.connection import Connection
from iot_realtime.hub import Hub, bulk_stream
from iot_testkit.processes import RedisServer, start_listening
from iot_testkit.waiting import wait_for
from tests.unit.test_realtime_hub import NAMES, TENANT, WAIT_S, FakeSocket, telemetry


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        server.stop()


class Running:
    def __init__(self, hub: Hub, stack: AsyncExitStack) -> None:
        self.hub = hub
        self._stack = stack

    async def client(self, *selectors: str) -> FakeSocket:
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
        for selector in selectors:
            conn.filters[selector] = None
        await self.hub.add(conn, selectors)
        return socket


@asynccontextmanager
async def running_hub(url: str, **options: float) -> AsyncIterator[Running]:
    hub = Hub(url, NAMES, **options)
    listener = asyncio.create_task(hub.run())
    async with AsyncExitStack() as stack:
        try:
            await asyncio.wait_for(hub.connected.wait(), WAIT_S)
            yield Running(hub, stack)
        finally:
            await stack.aclose()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await hub.close()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a state of the hub that no event announces (its connection being given up)."""
    await wait_for(condition, WAIT_S, "the hub's connection state", interval=0.01)


async def publish(url: str, *events: tuple[str, bytes]) -> None:
    client = aioredis.from_url(url)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for device_id, data in events:
                pipe.publish(NAMES.device_channel(TENANT, device_id), data)
            await pipe.execute()
    finally:
        await client.aclose()


async def test_a_burst_published_at_once_reaches_every_subscriber_in_order(redis_server: RedisServer) -> None:
    async with running_hub(redis_server.url) as running:
        assert running.hub._pubsub is not None
        assert bulk_stream(running.hub._pubsub) is not None
        one = await running.client("d1")
        two = await running.client("d2")
        every = await running.client("*")
        n = 3000
        await publish(
            redis_server.url, *((f"d{1 + i % 2}", telemetry(f"d{1 + i % 2}", n=float(i))) for i in range(n))
        )

        assert [(await one.next())["metrics"]["n"] for _ in range(n // 2)] == [
            float(i) for i in range(0, n, 2)
        ]
        assert [(await two.next())["metrics"]["n"] for _ in range(n // 2)] == [
            float(i) for i in range(1, n, 2)
        ]
        assert [(await every.next())["metrics"]["n"] for _ in range(n)] == [float(i) for i in range(n)]


async def test_a_password_or_an_acl_user_in_the_url_is_used() -> None:
    server = RedisServer()
    args = ["--port", str(server.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--requirepass", "s3cret", "--user", "reader", "on", ">r34d", "~*", "&*", "+@all"]
    server.proc = start_listening(["redis-server", *args], server.port, "redis-server")
    try:
        for credentials in (":s3cret", "reader:r34d"):
            url = f"redis://{credentials}@127.0.0.1:{server.port}/0"
            async with running_hub(url) as running:
                socket = await running.client("d1")
                await publish(url, ("d1", telemetry("d1", ok=1.0)))
                assert (await socket.next())["metrics"] == {"ok": 1.0}
    finally:
        server.stop()


async def test_after_redis_restarts_the_hub_resubscribes(redis_server: RedisServer) -> None:
    async with running_hub(redis_server.url, confirm_timeout=0.2) as running:
        socket = await running.client("d1")
        redis_server.stop()
        await until(lambda: not running.hub.connected.is_set())
        redis_server.start()
        await asyncio.wait_for(running.hub.connected.wait(), WAIT_S)
        await until(lambda: NAMES.device_channel(TENANT, "d1") in running.hub._listening)

        await publish(redis_server.url, ("d1", telemetry("d1", back=1.0)))
        assert (await socket.next())["metrics"] == {"back": 1.0}


async def test_a_redis_that_stops_answering_is_left_after_unanswered_pings(redis_server: RedisServer) -> None:
    async with running_hub(redis_server.url, idle_ping_s=0.1) as running:
        socket = await running.client("d1")
        first = running.hub._pubsub
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # the process hangs; its connections stay open
        try:
            await until(lambda: running.hub._pubsub is not first)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await asyncio.wait_for(running.hub.connected.wait(), WAIT_S)
        await until(lambda: NAMES.device_channel(TENANT, "d1") in running.hub._listening)

        await publish(redis_server.url, ("d1", telemetry("d1", alive=1.0)))
        assert (await socket.next())["metrics"] == {"alive": 1.0}
