"""``iot-realtime`` as a process, driven by real WebSocket clients, fed by events published on real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from iot_common.auth import generate_api_key
from iot_common.messages import AlertEvent, StatusEvent, TelemetryEvent, encode_event
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_testkit.processes import Start, private_redis
from tests.e2e.realtime_support import (
    ALLOWED_ORIGIN,
    DEFAULT,
    Realtime,
    assert_nothing_pending,
    close_code,
    open_ws,
    recv_json,
    register,
    start_realtime,
    subscribe,
    telemetry,
    token,
    token_without_read,
)


@pytest.fixture
def realtime(service: Start, database_url: str, redis_url: str) -> Realtime:
    return start_realtime(
        service,
        database_url,
        redis_url,
        {"IOT_REALTIME_AUTH_TIMEOUT_S": "1", "IOT_REALTIME_MAX_FRAME_BYTES": "1024"},
    )


async def test_subscriber_gets_latest_values_then_live_events_and_others_get_nothing(
    realtime: Realtime, database_url: str, redis: aioredis.Redis, unique: str
) -> None:
    dev, other = f"dev-{unique}", f"other-{unique}"
    await register(database_url, dev, other)
    await redis.hset(
        realtime.names.latest_key(dev), "temperature", b'{"value":20.5,"ts":"2026-01-01T00:00:00Z"}'
    )
    try:
        async with (
            open_ws(realtime.url(token())) as subscriber,
            open_ws(realtime.url(token())) as elsewhere,
            open_ws(realtime.url(token())) as idle,
        ):
            frames = await subscribe(subscriber, 1, [dev])
            assert frames == [
                {
                    "type": "latest",
                    "device_id": dev,
                    "metrics": {"temperature": {"value": 20.5, "ts": "2026-01-01T00:00:00Z"}},
                },
                {"type": "ack", "id": 1},
            ]
            assert await subscribe(elsewhere, 2, [other]) == [
                {"type": "latest", "device_id": other, "metrics": {}},
                {"type": "ack", "id": 2},
            ]
            event = telemetry(dev, temperature=21.5)
            assert await redis.publish(realtime.names.device_channel(DEFAULT, dev), event) == 1
            assert await asyncio.wait_for(subscriber.recv(), 10) == event.decode()  # forwarded unchanged
            status = encode_event(StatusEvent(device_id=dev, status="online", ts=datetime.now(UTC)))
            await redis.publish(realtime.names.device_channel(DEFAULT, dev), status)
            assert await asyncio.wait_for(subscriber.recv(), 10) == status.decode()
            await assert_nothing_pending(elsewhere)
            await assert_nothing_pending(idle)
    finally:
        await redis.delete(realtime.names.latest_key(dev))


async def test_unsubscribe_stops_delivery_and_drops_the_redis_channel(
    realtime: Realtime, database_url: str, redis: aioredis.Redis, unique: str
) -> None:
    dev = f"dev-{unique}"
    await register(database_url, dev)
    async with open_ws(realtime.url(token())) as a, open_ws(realtime.url(token())) as b:
        await subscribe(a, 1, [dev])
        await subscribe(b, 1, [dev])
        assert await redis.pubsub_numsub(realtime.names.device_channel(DEFAULT, dev)) == [
            (realtime.names.device_channel(DEFAULT, dev).encode(), 1)
        ]
        await a.send(json.dumps({"type": "unsubscribe", "id": 2, "devices": [dev]}))
        assert await recv_json(a) == {"type": "ack", "id": 2}
        await redis.publish(realtime.names.device_channel(DEFAULT, dev), telemetry(dev, temperature=1.0))
        assert (await recv_json(b))["metrics"] == {"temperature": 1.0}
        await assert_nothing_pending(a)
        await b.send(json.dumps({"type": "unsubscribe", "id": 3, "devices": [dev]}))
        assert await recv_json(b) == {"type": "ack", "id": 3}
        assert await redis.pubsub_numsub(realtime.names.device_channel(DEFAULT, dev)) == [
            (realtime.names.device_channel(DEFAULT, dev).encode(), 0)
        ]


async def test_metric_filter_and_wildcard(service: Start, database_url: str, unique: str) -> None:
    dev = f"dev-{unique}"
    await register(database_url, dev)
    # A private Redis: on the shared one, "*" would also see the events of other people's tests.
    with private_redis() as server:
        realtime = start_realtime(service, database_url, server.url)
        redis = aioredis.from_url(server.url)
        async with open_ws(realtime.url(token())) as filtered, open_ws(realtime.url(token())) as everything:
            await subscribe(filtered, 1, [dev], metrics=["temperature"])
            assert (await subscribe(everything, 1, ["*"]))[-1] == {"type": "ack", "id": 1}
            await redis.publish(realtime.names.device_channel(DEFAULT, dev), telemetry(dev, humidity=40.0))
            both = telemetry(dev, temperature=22.0, humidity=41.0)
            await redis.publish(realtime.names.device_channel(DEFAULT, dev), both)
            frame = await recv_json(filtered)
            assert (frame["device_id"], frame["metrics"]) == (dev, {"temperature": 22.0})
            await assert_nothing_pending(filtered)
            assert (await recv_json(everything))["metrics"] == {"humidity": 40.0}
            assert await asyncio.wait_for(everything.recv(), 10) == both.decode()
            await assert_nothing_pending(everything)
        await redis.aclose()


async def test_an_event_type_filter_sends_the_tenants_alerts_without_telemetry(
    service: Start, database_url: str, unique: str
) -> None:
    """``"types": ["alert"]`` with ``"*"``: every alert of the tenant, none of its readings (filtered in
    the gateway, so the telemetry never reaches the client), no snapshot; a device subscribed explicitly
    keeps its own (unfiltered) subscription."""
    dev, chosen = f"dev-{unique}", f"chosen-{unique}"
    await register(database_url, dev, chosen)
    with private_redis() as server:
        realtime = start_realtime(service, database_url, server.url)
        redis = aioredis.from_url(server.url)
        async with open_ws(realtime.url(token())) as ws:
            assert (await subscribe(ws, 1, ["*"], types=["alert"])) == [{"type": "ack", "id": 1}]
            snapshot = await subscribe(ws, 2, [chosen], types=["alert", "status"])
            assert snapshot == [{"type": "ack", "id": 2}]  # no latest frame without telemetry
            channel = realtime.names.device_channel(DEFAULT, dev)
            alert = AlertEvent(
                "a1", "r1", dev, "temperature", "critical", "open", "hot", 91.0, 90.0, datetime.now(UTC)
            )
            await redis.publish(channel, telemetry(dev, temperature=91.0))
            await redis.publish(channel, encode_event(StatusEvent(dev, "online", datetime.now(UTC))))
            await redis.publish(channel, encode_event(alert))
            await redis.publish(
                realtime.names.device_channel(DEFAULT, chosen), telemetry(chosen, temperature=1.0)
            )
            await redis.publish(
                realtime.names.device_channel(DEFAULT, chosen),
                encode_event(StatusEvent(chosen, "offline", datetime.now(UTC))),
            )
            frame = await recv_json(ws)
            assert (frame["type"], frame["device_id"], frame["id"]) == ("alert", dev, "a1")
            frame = await recv_json(ws)
            assert (frame["type"], frame["device_id"]) == ("status", chosen)
            await assert_nothing_pending(ws)
            # Backward compatible: without types, everything again.
            await subscribe(ws, 3, [chosen])
            await redis.publish(
                realtime.names.device_channel(DEFAULT, chosen), telemetry(chosen, temperature=2.0)
            )
            assert (await recv_json(ws))["metrics"] == {"temperature": 2.0}
        await redis.aclose()


@pytest.mark.parametrize(
    ("credential", "code", "reason"),
    [
        ("not-a-token", 4001, "invalid token"),
        ("expired", 4001, "token expired"),
        ("wrong-type", 4001, "not accepted"),
        ("no-read-scope", 4003, "read scope"),
        ("iotk_000000000000_unknown", 4001, "unknown API key"),
    ],
)
async def test_bad_credentials_are_refused_with_their_close_code(
    realtime: Realtime, credential: str, code: int, reason: str
) -> None:
    tokens = {
        "expired": token(ttl_s=-10),
        "wrong-type": token(token_type="refresh"),
        "no-read-scope": token_without_read(),
    }
    async with open_ws(realtime.url(tokens.get(credential, credential))) as ws:
        got_code, got_reason = await close_code(ws)
    assert got_code == code
    assert reason in (got_reason or "")


async def test_api_keys_and_the_auth_frame(
    realtime: Realtime, db: asyncpg.Connection[Any], unique: str
) -> None:
    await db.execute("INSERT INTO devices (id) VALUES ($1)", f"dev-{unique}")
    key, prefix, key_hash = generate_api_key()
    revoked, revoked_prefix, revoked_hash = generate_api_key()
    await db.execute(
        "INSERT INTO api_keys (tenant_id, name, prefix, key_hash, scopes, revoked_at) VALUES"
        " ($5, 'dash', $1, $2, '{read}', NULL), ($5, 'old', $3, $4, '{read}', now())",
        prefix,
        key_hash,
        revoked_prefix,
        revoked_hash,
        DEFAULT_TENANT_ID,
    )
    async with open_ws(realtime.url(key)) as ws:
        await assert_nothing_pending(ws)
    async with open_ws(realtime.url(revoked)) as ws:
        assert await close_code(ws) == (4001, "API key revoked")
    async with open_ws(realtime.url()) as ws:
        await ws.send(json.dumps({"type": "auth", "id": "a", "token": key}))
        assert await recv_json(ws) == {"type": "ack", "id": "a"}
        await ws.send(json.dumps({"type": "auth", "id": "b", "token": key}))
        assert (await recv_json(ws))["code"] == "already_authenticated"
        assert (await subscribe(ws, 1, [f"dev-{unique}"]))[-1] == {"type": "ack", "id": 1}
    async with open_ws(realtime.url()) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await close_code(ws) == (4001, "expected an auth frame first")
    async with open_ws(realtime.url()) as ws:  # says nothing: the auth timeout (1 s here) closes it
        code, reason = await close_code(ws)
        assert (code, "no credential" in (reason or "")) == (4001, True)


async def test_origin_is_checked_when_a_browser_sends_one(realtime: Realtime) -> None:
    async with open_ws(realtime.url(token()), origin="https://evil.example") as ws:
        assert await close_code(ws) == (4003, "origin not allowed: https://evil.example")
    async with open_ws(realtime.url(token()), origin=ALLOWED_ORIGIN) as ws:
        await assert_nothing_pending(ws)
    async with open_ws(realtime.url(token())) as ws:  # no Origin: not a browser
        await assert_nothing_pending(ws)


@pytest.mark.parametrize(
    ("frame", "code", "frame_id"),
    [
        ("not json", "bad_json", None),
        ('{"type": "subscribe", "id": 5, "devices": ["no/slash"]}', "bad_frame", 5),
        ('{"type": "subscribe", "id": 6, "devices": []}', "bad_frame", 6),
        ('{"type": "dance", "id": 7}', "bad_frame", 7),
        ('{"type": "ping", "id": 8, "extra": true}', "bad_frame", 8),
        (json.dumps({"type": "subscribe", "id": 9, "devices": ["d"] * 600}), "too_large", None),
        (b"\x00binary", "binary_frame", None),
    ],
)
async def test_malformed_frames_get_an_error_and_the_connection_stays_usable(
    realtime: Realtime, frame: str | bytes, code: str, frame_id: int | None
) -> None:
    async with open_ws(realtime.url(token())) as ws:
        await ws.send(frame)
        error = await recv_json(ws)
        assert (error["type"], error["code"], error.get("id")) == ("error", code, frame_id)
        assert error["message"]
        await assert_nothing_pending(ws)


async def test_deeply_nested_frames_are_refused_like_other_bad_frames(
    service: Start, database_url: str, redis_url: str
) -> None:
    realtime = start_realtime(service, database_url, redis_url)  # frames up to 64 KiB: room to nest
    deep = "[" * 3000 + "]" * 3000
    async with open_ws(realtime.url()) as ws:  # as the first frame: the handshake refuses it
        await ws.send(f'{{"type":"auth","token":"x","extra":{deep}}}')
        code, reason = await close_code(ws)
        assert (code, (reason or "").startswith("expected an auth frame: ")) == (4001, True)
    async with open_ws(realtime.url(token())) as ws:  # once authenticated: an error frame
        await ws.send(f'{{"type":"ping","id":1,"extra":{deep}}}')
        error = await recv_json(ws)
        assert (error["type"], error["code"]) == ("error", "bad_frame")
        await assert_nothing_pending(ws)


STALL_S = 2.0
"""The longest a fast client may wait for its next frame while another client does not read. The whole
fan-out takes about a second here, each client's frames 0.1 s apart at most; a fan-out that waits on the
stalled client (for its close timeout, 5 s by default, or for ever) stops every client for seconds."""


async def test_a_client_that_never_reads_does_not_delay_a_hundred_others(
    service: Start, database_url: str, redis_url: str, redis: aioredis.Redis, unique: str
) -> None:
    realtime = start_realtime(service, database_url, redis_url)
    dev, backlog = f"dev-{unique}", f"backlog-{unique}"
    await register(database_url, dev, backlog)
    count, fast_clients, backlog_frames = 200, 100, 330
    padding = "x" * 4000
    # max_queue=1: the stalled client stops reading from its socket once one frame is buffered.
    async with open_ws(realtime.url(token()), max_queue=1) as stalled:
        await subscribe(stalled, 1, [dev, backlog])
        # One user each: a credential may hold 100 connections (IOT_REALTIME_MAX_CONNECTIONS_PER_PRINCIPAL).
        clients = [
            await open_ws(realtime.url(token(subject=f"user-{i}"))).__aenter__() for i in range(fast_clients)
        ]
        try:
            for ws in clients:
                await subscribe(ws, 1, [dev])
            sent_before = realtime.metric("iot_realtime_messages_out_total")
            # 20 MB for the stalled client alone: more than the socket buffers on both sides take, so the
            # service's writer for it is stuck from here on (checked below) while it fans out to the others.
            for _ in range(backlog_frames):
                await redis.publish(
                    realtime.names.device_channel(DEFAULT, backlog), telemetry(backlog, note="x" * 60_000)
                )
            published_at = time.monotonic()
            longest_waits: list[float] = []

            async def consume(ws: Any) -> None:
                """Read every event; note the longest wait for the next one (from the first publish)."""
                last, longest = published_at, 0.0
                for i in range(count):
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    now = time.monotonic()
                    longest, last = max(longest, now - last), now
                    assert frame["metrics"]["seq"] == i
                longest_waits.append(longest)

            consumers = asyncio.gather(*(consume(ws) for ws in clients))
            for i in range(count):
                await redis.publish(
                    realtime.names.device_channel(DEFAULT, dev), telemetry(dev, seq=float(i), note=padding)
                )
            await asyncio.wait_for(consumers, 60)
            assert len(longest_waits) == fast_clients
            # No stall: a bound far above this machine's noise, far below a wait on the stalled client.
            assert max(longest_waits) < STALL_S, sorted(longest_waits)[-5:]
            # The stalled client really held its writer: not every frame was sent (frames sent are counted
            # when a writer has emptied its queue).
            sent = realtime.metric("iot_realtime_messages_out_total") - sent_before
            assert sent < backlog_frames + count * (fast_clients + 1)
        finally:
            for ws in clients:
                await ws.close()


async def test_a_client_whose_queue_overflows_is_dropped_with_4008(
    service: Start, database_url: str, redis_url: str, redis: aioredis.Redis, unique: str
) -> None:
    env = {"IOT_REALTIME_QUEUE_SIZE": "20", "IOT_REALTIME_CLOSE_TIMEOUT_S": "30"}
    realtime = start_realtime(service, database_url, redis_url, env)
    dev = f"dev-{unique}"
    await register(database_url, dev)
    big = telemetry(dev, note="x" * 60_000)
    async with open_ws(realtime.url(token()), max_queue=1, max_size=None) as stalled:
        await subscribe(stalled, 1, [dev])
        published = 0
        # Socket buffers take some megabytes before the server-side queue starts to fill.
        while realtime.metric("iot_realtime_dropped_connections_total") == 0:
            assert published < 3000, "the stalled client was never dropped"
            for _ in range(50):
                await redis.publish(realtime.names.device_channel(DEFAULT, dev), big)
            published += 50
        code, reason = await close_code(stalled, timeout=30)
    assert (code, reason) == (4008, "outgoing queue overflow: client too slow")
    assert realtime.metric("iot_realtime_dropped_messages_total") >= 1


async def test_subscriptions_survive_a_redis_restart(service: Start, database_url: str, unique: str) -> None:
    dev = f"dev-{unique}"
    await register(database_url, dev)
    with private_redis() as server:
        realtime = start_realtime(service, database_url, server.url)
        async with open_ws(realtime.url(token())) as ws, open_ws(realtime.url(token())) as everything:
            await subscribe(ws, 1, [dev])
            await subscribe(everything, 1, ["*"])
            await _publish_until_received(realtime, server.url, ws, dev, 1.0)
            server.stop()
            realtime.proc.wait_http(f"{realtime.base}/readyz", status=503)
            server.start()
            realtime.proc.wait_http(f"{realtime.base}/readyz", status=200)
            await _publish_until_received(realtime, server.url, ws, dev, 2.0)
            await _publish_until_received(realtime, server.url, everything, dev, 3.0)
            assert realtime.metric("iot_realtime_redis_reconnects_total") >= 1
            # The device channel and the "*" pattern, restored on the new Redis.
            assert realtime.metric("iot_realtime_redis_channels") == 2


async def _publish_until_received(realtime: Realtime, url: str, ws: Any, dev: str, value: float) -> None:
    """Publish every 200 ms until the client gets the event (Redis may still be resubscribing)."""
    client = aioredis.from_url(url)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError, aioredis.ConnectionError):
                await client.publish(realtime.names.device_channel(DEFAULT, dev), telemetry(dev, v=value))
            try:
                frame = await recv_json(ws, timeout=0.2)
            except TimeoutError:
                assert time.monotonic() < deadline, "no event after the Redis restart"
                continue
            if frame.get("metrics") == {"v": value}:
                return
    finally:
        await client.aclose()


async def test_heartbeats_close_a_peer_that_vanished(
    service: Start, database_url: str, redis_url: str
) -> None:
    realtime = start_realtime(service, database_url, redis_url, {"IOT_REALTIME_HEARTBEAT_S": "1"})
    # A bare TCP client that completes the handshake, then neither reads nor answers pings.
    reader, writer = await asyncio.open_connection("127.0.0.1", realtime.port)
    writer.write(
        f"GET /ws?token={token()} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        assert realtime.metric("iot_realtime_connections") == 1
        # The server pings after 1 s and gives up 0.5 s later: the socket reaches EOF.
        rest = await asyncio.wait_for(reader.read(), 15)
        assert rest.startswith(b"\x89"), rest  # what it got before the close: the unanswered ping
        await realtime.wait_metric("iot_realtime_connections", 0)
    finally:
        writer.close()


async def test_sigterm_closes_sockets_with_going_away(
    realtime: Realtime, database_url: str, unique: str
) -> None:
    await register(database_url, f"dev-{unique}")
    async with open_ws(realtime.url(token())) as a, open_ws(realtime.url(token())) as b:
        await subscribe(a, 1, [f"dev-{unique}"])
        await assert_nothing_pending(b)
        stopping = asyncio.get_running_loop().run_in_executor(None, realtime.proc.stop, signal.SIGTERM)
        assert await close_code(a) == (1001, "server shutting down")
        assert await close_code(b) == (1001, "server shutting down")
        assert await stopping == 0


async def test_metrics_count_connections_subscriptions_and_messages(
    realtime: Realtime, database_url: str, redis: aioredis.Redis, unique: str
) -> None:
    dev = f"dev-{unique}"
    await register(database_url, dev, f"{dev}-b")
    async with open_ws(realtime.url(token())) as ws:
        await subscribe(ws, 1, [dev, f"{dev}-b"])
        assert realtime.metric("iot_realtime_connections") == 1
        assert realtime.metric("iot_realtime_subscriptions") == 2
        assert realtime.metric("iot_realtime_redis_channels") == 2
        event = encode_event(TelemetryEvent(dev, datetime.now(UTC), {"t": 1.0}))
        await redis.publish(realtime.names.device_channel(DEFAULT, dev), event)
        await recv_json(ws)
        assert realtime.metric("iot_realtime_messages_in_total") == 1
        assert realtime.metric("iot_realtime_messages_out_total") >= 4  # 2 snapshots, ack, event
    await realtime.wait_metric("iot_realtime_connections", 0)
    assert realtime.metric("iot_realtime_redis_channels") == 0
