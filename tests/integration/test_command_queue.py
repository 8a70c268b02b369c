"""Commands queued for offline devices, against the real PostgreSQL and Redis: the claim takes a device's
queued commands oldest first and never one past its deadline, expiry takes queued commands, concurrent
claims never take one command twice, the flush publishes in order and defines what a failed publication
does, and the API's status check waits for a flush in progress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from iot_common.commands import (
    LOCK_DEVICE_QUEUE,
    QUEUE_LOCK_CLASS,
    UNLOCK_DEVICE_QUEUE,
    claim_queued,
    create_command,
    device_status_locked,
    expire_commands,
)
from iot_common.db import create_pool
from iot_common.messages import DeviceStatus, Reading
from iot_common.mqtt import PublishError, PublishRefused
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_ingest.devices import KnownDevices
from iot_ingest.plan import Delivery
from iot_ingest.presence import QueueFlush
from iot_ingest.redis_output import RedisOutput
from iot_ingest.writer import BatchWriter
from iot_testkit.channels import subscribe_confirmed
from iot_testkit.waiting import wait_for

HOUR = timedelta(hours=1)


async def offline_device(db: asyncpg.Connection[Any], device_id: str) -> None:
    await db.execute("INSERT INTO devices (id, status) VALUES ($1, 'offline')", device_id)


async def queue(db: asyncpg.Connection[Any], device_id: str, name: str, ttl: timedelta = HOUR) -> str:
    row = await create_command(db, device_id, name, {"n": name}, ttl, "queued")
    assert row["state"] == "queued"
    return str(row["id"])


async def states(db: asyncpg.Connection[Any], device_id: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT name, state FROM commands WHERE device_id = $1 ORDER BY created_at", device_id
    )
    return [(r["name"], r["state"]) for r in rows]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await create_pool(database_url, min_size=1, max_size=6)
    yield pool
    await pool.close()


async def test_claims_take_queued_commands_oldest_first_and_skip_those_past_their_deadline(
    db: asyncpg.Connection[Any], unique: str
) -> None:
    device, other = f"q-{unique}", f"o-{unique}"
    await offline_device(db, device)
    await offline_device(db, other)
    first = await queue(db, device, "a")
    late = await queue(db, device, "late", timedelta(seconds=-1))  # its deadline has passed
    await queue(db, other, "elsewhere")
    second = await queue(db, device, "b")
    claimed = [await claim_queued(db, device), await claim_queued(db, device), await claim_queued(db, device)]
    assert [r and r["id"] for r in claimed] == [first, second, None]
    assert all(r["state"] == "pending" and r["tenant_id"] == str(DEFAULT_TENANT_ID) for r in claimed[:2])
    assert await states(db, device) == [("a", "pending"), ("late", "queued"), ("b", "pending")]
    # The expiry job takes the queued command past its deadline; nothing is left to claim.
    expired = await expire_commands(db)
    assert [(e.id, e.state) for _, e in expired] == [(late, "expired")]
    assert await claim_queued(db, device) is None
    assert await states(db, other) == [("elsewhere", "queued")]


async def test_concurrent_claims_never_take_a_command_twice(
    pool: asyncpg.Pool[Any], db: asyncpg.Connection[Any], unique: str
) -> None:
    device = f"c-{unique}"
    await offline_device(db, device)
    ids = [await queue(db, device, f"c{i}") for i in range(60)]

    async def claimer() -> list[str]:
        taken = []
        async with pool.acquire() as conn:
            while (row := await claim_queued(conn, device)) is not None:
                taken.append(row["id"])
        return taken

    results = await asyncio.gather(*(claimer() for _ in range(5)))
    everything = [i for taken in results for i in taken]
    assert sorted(everything) == sorted(ids)  # each command once, none left behind
    assert len(set(everything)) == len(ids)
    for taken in results:  # each claimer took its share oldest first
        assert taken == sorted(taken, key=ids.index)


class Broker:
    """Stands for the MQTT connection: records each publication, or fails it as told."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.failures: dict[str, Exception] = {}
        self.delays: dict[str, float] = {}

    async def __call__(self, topic: str, payload: bytes) -> None:
        name = json.loads(payload)["name"]
        await asyncio.sleep(self.delays.get(name, 0.0))
        if name in self.failures:
            raise self.failures[name]
        self.published.append(f"{topic} {name}")


async def command_events(pubsub: Any, count: int) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    while len(events) < count:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None, f"only {events}"
        event = json.loads(message["data"])
        events.append((event["name"], event["state"]))
    return events


async def test_the_flush_publishes_in_order_once_even_from_two_replicas(
    pool: asyncpg.Pool[Any], db: asyncpg.Connection[Any], redis: aioredis.Redis, unique: str
) -> None:
    device = f"f-{unique}"
    await offline_device(db, device)
    names = RedisNames(f"t{unique}")
    for i in range(20):
        await queue(db, device, f"c{i:02d}")
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, names.device_channel(DEFAULT_TENANT_ID, device))
    broker = Broker()
    # Slow PUBACKs for every other command: two replicas flushing side by side would publish out of order.
    broker.delays = {f"c{i:02d}": 0.03 for i in range(0, 20, 2)}
    flushes = [QueueFlush(pool, redis, names, broker), QueueFlush(pool, redis, names, broker)]
    await db.execute("UPDATE devices SET status = 'online' WHERE id = $1", device)
    # Two replicas each got an online status of the device (e.g. two reconnections).
    await asyncio.gather(flushes[0]([device]), flushes[1]([device]))
    expected = [f"devices/commands/{device} c{i:02d}" for i in range(20)]
    assert broker.published == expected
    assert await states(db, device) == [(f"c{i:02d}", "sent") for i in range(20)]
    assert await command_events(pubsub, 20) == [(f"c{i:02d}", "sent") for i in range(20)]
    await pubsub.aclose()


async def test_a_refused_command_fails_and_an_unpublished_one_goes_back_to_the_queue(
    pool: asyncpg.Pool[Any], db: asyncpg.Connection[Any], redis: aioredis.Redis, unique: str
) -> None:
    device = f"r-{unique}"
    await offline_device(db, device)
    names = RedisNames(f"t{unique}")
    for name in ("a", "refused", "b", "lost", "c"):
        await queue(db, device, name)
    broker = Broker()
    broker.failures = {"refused": PublishRefused(0x87), "lost": PublishError("no PUBACK in time", "timeout")}
    flush = QueueFlush(pool, redis, names, broker)
    assert await flush.flush(device) == 2
    assert broker.published == [f"devices/commands/{device} a", f"devices/commands/{device} b"]
    assert await states(db, device) == [
        ("a", "sent"),
        ("refused", "failed"),
        ("b", "sent"),
        ("lost", "queued"),  # back in the queue, and the device's flush stopped to keep the order
        ("c", "queued"),
    ]
    errors = dict(await db.fetch("SELECT name, error FROM commands WHERE device_id = $1", device))
    assert errors["refused"] == "not published: broker refused: not authorized (135)"
    assert errors["lost"] == "not published: PublishError: no PUBACK in time"
    # The next time the device comes online, the rest goes out in order.
    broker.failures = {}
    assert await flush.flush(device) == 2
    assert broker.published[2:] == [f"devices/commands/{device} lost", f"devices/commands/{device} c"]
    assert (
        await db.fetchval("SELECT error FROM commands WHERE device_id = $1 AND name = 'lost'", device) is None
    )


async def test_the_api_status_check_waits_for_a_flush_in_progress(
    pool: asyncpg.Pool[Any], db: asyncpg.Connection[Any], unique: str
) -> None:
    device = f"l-{unique}"
    await offline_device(db, device)
    async with pool.acquire() as flusher:
        await flusher.execute(LOCK_DEVICE_QUEUE, QUEUE_LOCK_CLASS, device)

        async def api_check() -> str | None:
            async with pool.acquire() as conn, conn.transaction():
                return await device_status_locked(conn, DEFAULT_TENANT_ID, device)

        check = asyncio.create_task(api_check())

        async def waiting() -> bool:
            count = await db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid::bigint = $1"
                " AND objid::bigint = (hashtext($2)::bigint + 4294967296) % 4294967296",  # oid: unsigned
                QUEUE_LOCK_CLASS,
                device,
            )
            return bool(count)

        await wait_for(waiting, 10, "the status check to wait for the device's queue lock")
        assert not check.done()
        # The device came online (committed before the flush took the lock, here while it holds it).
        await db.execute("UPDATE devices SET status = 'online' WHERE id = $1", device)
        await flusher.execute(UNLOCK_DEVICE_QUEUE, QUEUE_LOCK_CLASS, device)
        assert await asyncio.wait_for(check, 5) == "online"
    # Another tenant's device (or no device) is None.
    async with pool.acquire() as conn, conn.transaction():
        assert await device_status_locked(conn, "00000000-0000-0000-0000-0000000000ff", device) is None


async def test_the_writer_reports_devices_that_came_online_by_status_or_by_a_reading(
    database_url: str, db: asyncpg.Connection[Any], redis: aioredis.Redis, unique: str
) -> None:
    ids = {k: f"{k}-{unique}" for k in ("sleepy", "back", "awake", "fresh", "leaves")}
    for key, initial in (
        ("sleepy", "offline"),
        ("back", "offline"),
        ("awake", "online"),
        ("leaves", "online"),
    ):
        await db.execute("INSERT INTO devices (id, status) VALUES ($1, $2)", ids[key], initial)
    await db.execute("INSERT INTO devices (id) VALUES ($1)", ids["fresh"])  # never reported: unknown
    pool = await create_pool(database_url, min_size=1, max_size=2)
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    came_online: list[list[str]] = []
    writer = BatchWriter(
        pool,
        known,
        RedisOutput(redis, RedisNames(f"w{unique}")),
        auto_register=False,
        on_online=lambda devices, _task: came_online.append(devices),
    )
    now = datetime.now(UTC)

    def reading(key: str) -> Delivery:
        return Delivery(
            "devices/telemetry/x", ids[key], now, b"{}", readings=[Reading(ids[key], now, {"t": 1.0})]
        )

    def status(key: str, value: DeviceStatus) -> Delivery:
        return Delivery("devices/status/x", ids[key], now, value.encode(), status=value)

    try:
        await writer(
            [
                reading("sleepy"),
                status("back", "online"),
                reading("awake"),
                reading("fresh"),
                status("leaves", "offline"),
            ]
        )
        await writer.drain()
    finally:
        await pool.close()
    assert came_online == [sorted([ids["sleepy"], ids["back"]])]
    rows = dict(
        await db.fetch("SELECT id, status FROM devices WHERE id = ANY($1::text[])", list(ids.values()))
    )
    assert rows == {
        ids["sleepy"]: "online",
        ids["back"]: "online",
        ids["awake"]: "online",
        ids["fresh"]: "unknown",
        ids["leaves"]: "offline",
    }
