"""Gap-free resume: a subscribe frame with ``since`` gets the readings stored after it, then live events.

The first test is the whole path (publisher process -> Mosquitto -> ``iot-ingest`` -> PostgreSQL and Redis
-> ``iot-realtime`` -> a WebSocket client here) with the gateway killed (SIGKILL) and restarted while the
publisher runs: the client reconnects with each device's last ``ts`` and in the end holds exactly the
readings PostgreSQL stored, each once. The others drive ``iot-realtime`` alone over rows written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from iot_testkit.chaos import Platform, TcpProxy
from iot_testkit.loadgen import device_ids
from iot_testkit.processes import Start
from iot_testkit.tokens import user_token
from iot_testkit.waiting import wait_for

from .realtime_support import (
    DEFAULT,
    SECRET,
    Realtime,
    open_ws,
    recv_json,
    register,
    start_realtime,
    subscribe,
    telemetry,
    token,
)

Key = tuple[str, datetime]


def parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


class Client:
    """A WebSocket client that reconnects when the gateway goes away, resuming each device with ``since``
    (one subscribe frame per device), and records every telemetry frame it receives."""

    def __init__(self, url: str, devices: list[str]) -> None:
        self.url = url
        self.devices = devices
        self.received: list[Key] = []
        self.backfilled = 0
        self.last: dict[str, datetime] = {}
        self.started: datetime | None = None
        self.connects = 0
        self.acked = asyncio.Event()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError, ConnectionClosed, TimeoutError):
                async with open_ws(self.url) as ws:
                    self.connects += 1
                    await self._session(ws)
            await asyncio.sleep(0.1)

    async def _session(self, ws: ClientConnection) -> None:
        acks = 0
        for n, device_id in enumerate(self.devices):
            frame: dict[str, Any] = {"type": "subscribe", "id": n, "devices": [device_id]}
            if self.started is not None:
                frame["since"] = self.last.get(device_id, self.started).isoformat()
            await ws.send(json.dumps(frame))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "telemetry":
                ts = parse_ts(frame["ts"])
                self.received.append((frame["device_id"], ts))
                self.backfilled += bool(frame.get("backfill"))
                seen = self.last.get(frame["device_id"])
                if seen is None or ts > seen:
                    self.last[frame["device_id"]] = ts
            elif frame["type"] == "ack":
                acks += 1
                if acks == len(self.devices):
                    if self.started is None:
                        self.started = datetime.now(UTC)
                    self.acked.set()
            elif frame["type"] == "error":
                raise AssertionError(frame)


@pytest.mark.timeout(150)
async def test_a_client_resuming_after_the_gateway_was_killed_misses_nothing_and_gets_nothing_twice(
    service: Start, database_url: str, db: asyncpg.Connection[Any], unique: str, tmp_path: Path
) -> None:
    devices = device_ids(f"resume-{unique}", 4)
    await db.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", devices)
    platform = Platform(service, database_url, devices, tmp_path)
    client = Client(f"ws://127.0.0.1:{platform.realtime_port}/ws?token={token(ttl_s=600)}", devices)
    running: asyncio.Task[None] | None = None
    try:
        platform.broker.start()
        platform.redis.start()
        await platform.proxy.start()
        await platform.start_ingest()
        await platform.start_realtime()
        running = asyncio.create_task(client.run())
        await asyncio.wait_for(client.acked.wait(), 30)
        assert client.started is not None
        publishing = asyncio.create_task(platform.publish_for(6, 400))
        await wait_for(lambda: len(client.received) > 200, 30, "live readings before the kill")
        assert platform.realtime is not None
        client.acked.clear()
        platform.realtime.kill()
        killed_at = len(client.received)
        await asyncio.sleep(1.0)  # readings go on being stored while no gateway runs
        await platform.start_realtime()
        await asyncio.wait_for(client.acked.wait(), 30)
        acked, _ = await publishing
        assert len(acked) > 1500

        async def stored() -> set[Key]:
            rows = await db.fetch(
                "SELECT DISTINCT device_id, ts FROM telemetry WHERE device_id = ANY($1::text[]) AND ts > $2",
                devices,
                client.started,
            )
            return {(r["device_id"], r["ts"]) for r in rows}

        async def all_received() -> bool:
            expected = await stored()
            return len(expected) >= len(acked) and expected <= set(client.received)

        await wait_for(all_received, 30, "every stored reading on the WebSocket")
        expected = await stored()
        received = [key for key in client.received if key[1] > client.started]
        assert client.connects == 2
        assert client.backfilled > 0, "the outage was not covered by the backfill"
        assert len(client.received) > killed_at
        assert set(received) == expected
        assert len(received) == len(set(received)), "a reading reached the client twice"
    finally:
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        await platform.stop()


# -- the gateway alone, over rows written here ---------------------------------------------------------


@pytest.fixture
def realtime(service: Start, database_url: str, redis_url: str) -> Realtime:
    return start_realtime(service, database_url, redis_url, {"IOT_REALTIME_MAX_BACKFILL": "5"})


async def store(db: asyncpg.Connection[Any], device_id: str, start: datetime, count: int) -> list[datetime]:
    """``count`` readings of ``device_id`` (metrics ``t`` and ``s``), one per second from ``start``."""
    stamps = [start + timedelta(seconds=n) for n in range(count)]
    await db.executemany(
        "INSERT INTO telemetry (device_id, metric, ts, value, value_text) VALUES ($1, $2, $3, $4, $5)",
        [(device_id, "t", ts, float(n), None) for n, ts in enumerate(stamps)]
        + [(device_id, "s", ts, None, f"s{n}") for n, ts in enumerate(stamps)],
    )
    return stamps


async def frames_until_ack(ws: ClientConnection, frame: dict[str, Any]) -> list[dict[str, Any]]:
    await ws.send(json.dumps(frame))
    frames = []
    while True:
        got = await recv_json(ws)
        frames.append(got)
        if got["type"] in ("ack", "error"):
            return frames


async def test_since_sends_the_most_recent_readings_up_to_the_limit_and_says_truncated(
    realtime: Realtime, database_url: str, db: asyncpg.Connection[Any], unique: str
) -> None:
    device = f"bf-{unique}"
    await register(database_url, device)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    stamps = await store(db, device, start, 8)
    async with open_ws(realtime.url(token())) as ws:
        # Readings after the 2nd one: 6 stored, 5 sent (the most recent), oldest first.
        since = stamps[1].isoformat()
        frames = await frames_until_ack(
            ws, {"type": "subscribe", "id": 1, "devices": [device], "since": since}
        )
        telemetry = [f for f in frames if f["type"] == "telemetry"]
        assert [parse_ts(f["ts"]) for f in telemetry] == stamps[3:]
        assert telemetry[0] == {
            "type": "telemetry",
            "device_id": device,
            "ts": telemetry[0]["ts"],
            "metrics": {"s": "s3", "t": 3.0},
            "backfill": True,
        }
        assert frames[-1] == {"type": "ack", "id": 1, "backfilled": 5, "truncated": True}
        # From the 4th: 4 readings, all sent; limited to one metric as the frame asks.
        since = stamps[3].isoformat()
        frame = {"type": "subscribe", "id": 2, "devices": [device], "since": since, "metrics": ["t"]}
        frames = await frames_until_ack(ws, frame)
        telemetry = [f for f in frames if f["type"] == "telemetry"]
        assert [f["metrics"] for f in telemetry] == [{"t": 4.0}, {"t": 5.0}, {"t": 6.0}, {"t": 7.0}]
        assert frames[-1] == {"type": "ack", "id": 2, "backfilled": 4, "truncated": False}
        # After the last one: nothing, and not truncated.
        frame = {"type": "subscribe", "id": 3, "devices": [device], "since": stamps[-1].isoformat()}
        frames = await frames_until_ack(ws, frame)
        assert [f["type"] for f in frames] == ["latest", "ack"]
        assert frames[-1] == {"type": "ack", "id": 3, "backfilled": 0, "truncated": False}
        # Without since, the ack is as before.
        frames = await subscribe(ws, 4, [device])
        assert frames[-1] == {"type": "ack", "id": 4}


async def test_since_without_an_offset_is_refused_naming_the_field(realtime: Realtime, unique: str) -> None:
    async with open_ws(realtime.url(token())) as ws:
        frame = {"type": "subscribe", "id": 7, "devices": ["*"], "since": "2026-01-01T00:00:00"}
        frames = await frames_until_ack(ws, frame)
        assert frames[-1]["type"] == "error"
        assert frames[-1]["code"] == "bad_frame"
        assert frames[-1]["id"] == 7
        assert "since" in frames[-1]["message"]
        frame = {"type": "subscribe", "id": 8, "devices": ["*"], "since": "yesterday"}
        frames = await frames_until_ack(ws, frame)
        assert frames[-1]["code"] == "bad_frame"
        assert "since" in frames[-1]["message"]


async def test_a_wildcard_with_since_backfills_the_own_tenant_only(
    realtime: Realtime, database_url: str, db: asyncpg.Connection[Any], unique: str
) -> None:
    other = await db.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"other-{unique}")
    mine, theirs = f"mine-{unique}", f"theirs-{unique}"
    await register(database_url, mine)
    await db.execute("INSERT INTO devices (id, tenant_id) VALUES ($1, $2)", theirs, other)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    await store(db, mine, start, 2)
    await store(db, theirs, start, 2)
    since = (start - timedelta(seconds=1)).isoformat()
    async with open_ws(realtime.url(token())) as ws:
        frames = await frames_until_ack(ws, {"type": "subscribe", "id": 1, "devices": ["*"], "since": since})
        assert {f["device_id"] for f in frames if f["type"] == "telemetry"} == {mine}
        assert frames[-1] == {"type": "ack", "id": 1, "backfilled": 2, "truncated": False}
    # The other tenant's client gets its own device's readings (and never "mine").
    other_token = user_token(SECRET, f"other-{unique}", tenant_id=uuid.UUID(str(other)))
    async with open_ws(realtime.url(other_token)) as ws:
        frames = await frames_until_ack(ws, {"type": "subscribe", "id": 1, "devices": ["*"], "since": since})
        assert {f["device_id"] for f in frames if f["type"] == "telemetry"} == {theirs}
        frames = await frames_until_ack(ws, {"type": "subscribe", "id": 2, "devices": [mine], "since": since})
        assert frames == [
            {
                "type": "error",
                "code": "unknown_device",
                "message": "1 unknown device(s): " + mine,
                "id": 2,
                "devices": [mine],
            }
        ]


async def test_since_while_postgresql_cannot_be_read_subscribes_and_says_truncated(
    service: Start, database_url: str, redis_url: str, redis: aioredis.Redis, unique: str
) -> None:
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    user = f"{parts.username}@" if parts.username else ""
    proxied = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))
    # In a thread: the proxy runs in this event loop and must serve the start-up.
    replica = await asyncio.to_thread(start_realtime, service, proxied, redis_url)
    device = f"nodb-{unique}"
    await register(database_url, device)
    try:
        async with open_ws(replica.url(token())) as ws:
            assert (await subscribe(ws, 1, [device]))[-1] == {
                "type": "ack",
                "id": 1,
            }  # the device is known now
            await proxy.cut()
            since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
            frame = {"type": "subscribe", "id": 2, "devices": [device], "since": since}
            frames = await frames_until_ack(ws, frame)
            assert frames[-1] == {"type": "ack", "id": 2, "backfilled": 0, "truncated": True}
            # Subscribed all the same: live events flow.
            await redis.publish(replica.names.device_channel(DEFAULT, device), telemetry(device, t=1.0))
            got = await recv_json(ws)
            assert (got["type"], got["device_id"], got["metrics"]) == ("telemetry", device, {"t": 1.0})
    finally:
        with contextlib.suppress(Exception):
            await proxy.cut()
