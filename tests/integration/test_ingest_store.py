"""The ingest writer against a real PostgreSQL (and Redis): one message that cannot be stored never holds
the batch; dead letters belong to their device's tenant; tenants' limits hold across replicas.

Before, a fault on one message that was not a PostgreSQL data error (here, a value the code cannot turn
into a row) was retried as a whole batch for ever: no PUBACK for any message of the batch, and every later
batch waiting behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from iot_common.db import create_pool
from iot_common.messages import Reading
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_ingest import writer as writer_module
from iot_ingest.app import create_writer_pool
from iot_ingest.devices import KnownDevices
from iot_ingest.payload import Reject
from iot_ingest.plan import DeadLetter, Delivery, Outcome
from iot_ingest.redis_output import RedisOutput
from iot_ingest.tenant_quota import TenantQuota
from iot_ingest.writer import BatchWriter
from iot_testkit.channels import subscribe_confirmed


@pytest.fixture
async def writer(
    database_url: str, redis: aioredis.Redis, db: asyncpg.Connection[Any], unique: str
) -> AsyncIterator[BatchWriter]:
    await db.execute("INSERT INTO devices (id) VALUES ('good'), ('odd')")
    pool = await create_pool(database_url, min_size=1, max_size=2)
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    writer = BatchWriter(
        pool,
        known,
        RedisOutput(redis, RedisNames(f"store{unique}")),
        auto_register=False,
        retry_initial_s=0.01,
        retry_max_s=0.05,
    )
    try:
        yield writer
    finally:
        await writer.drain()
        await pool.close()


def delivery(device_id: str, value: Any, ts: datetime) -> Delivery:
    topic = f"devices/telemetry/{device_id}"
    return Delivery(topic, device_id, ts, b'{"t": 1}', readings=[Reading(device_id, ts, {"t": value})])


async def test_a_message_the_code_cannot_store_is_a_dead_letter_and_the_others_are_stored(
    writer: BatchWriter, db: asyncpg.Connection[Any]
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    batch = [
        delivery("good", 1.0, now),
        delivery("odd", object(), now),
        delivery("good", 2.0, now + timedelta(seconds=1)),
    ]
    # A hang here is the bug: the batch retried for ever.
    await asyncio.wait_for(writer(batch), 60)
    rows = await db.fetch("SELECT device_id, value FROM telemetry ORDER BY ts")
    assert [(r["device_id"], r["value"]) for r in rows] == [("good", 1.0), ("good", 2.0)]
    letters = await db.fetch("SELECT device_id, reason, detail FROM ingest_rejects")
    assert [(r["device_id"], r["reason"]) for r in letters] == [("odd", "handler_error")]
    assert "TypeError" in letters[0]["detail"]


async def test_a_dead_letter_postgresql_refuses_is_replaced_by_a_bare_one(
    writer: BatchWriter, db: asyncpg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unstorable(d: Delivery, reason: Any, detail: str, tenant_id: str | None = None) -> DeadLetter:
        return DeadLetter(d.topic, d.device_id, reason, "NUL \x00 in text", "x", 1, d.received_at)

    monkeypatch.setattr(writer_module, "dead_letter", unstorable)
    now = datetime.now(UTC).replace(microsecond=0)
    await asyncio.wait_for(writer([delivery("odd", object(), now), delivery("good", 3.0, now)]), 60)
    assert await db.fetchval("SELECT value FROM telemetry") == 3.0
    letter = await db.fetchrow("SELECT topic, reason, detail, payload, payload_size FROM ingest_rejects")
    assert letter["topic"] == "devices/telemetry/odd"
    assert letter["reason"] == "handler_error"
    assert letter["detail"].startswith("dead letter refused")
    assert (letter["payload"], letter["payload_size"]) == ("", 8)


async def add_tenant(db: asyncpg.Connection[Any], name: str, **limits: int) -> str:
    tenant_id: uuid.UUID = await db.fetchval(
        "INSERT INTO tenants (name, max_devices, max_readings_per_s) VALUES ($1, $2, $3) RETURNING id",
        name,
        limits.get("max_devices"),
        limits.get("max_readings_per_s"),
    )
    return str(tenant_id)


@contextlib.asynccontextmanager
async def replicas(
    database_url: str, redis: aioredis.Redis, names: RedisNames, count: int, register_into: str
) -> AsyncIterator[list[BatchWriter]]:
    """``count`` writers as ``count`` ingest replicas have them: each its own pool and device cache, one
    PostgreSQL and one Redis."""
    pools = [await create_pool(database_url, min_size=1, max_size=2) for _ in range(count)]
    writers = []
    for pool in pools:
        known = KnownDevices(register_into)
        await known.refresh(pool)
        writers.append(
            BatchWriter(
                pool, known, RedisOutput(redis, names), auto_register=True, quota=TenantQuota(redis, names)
            )
        )
    try:
        yield writers
    finally:
        for writer, pool in zip(writers, pools, strict=True):
            await writer.drain()
            await pool.close()


async def test_replicas_auto_register_into_the_tenant_named_and_never_past_its_device_limit(
    database_url: str, redis: aioredis.Redis, db: asyncpg.Connection[Any], unique: str
) -> None:
    acme = await add_tenant(db, f"acme-{unique}", max_devices=5)
    await db.execute("INSERT INTO devices (id, tenant_id) VALUES ('acme-old', $1)", acme)
    now = datetime.now(UTC).replace(microsecond=0)
    async with replicas(database_url, redis, RedisNames(f"store{unique}"), 2, f"ACME-{unique}") as (a, b):
        # Both replicas meet new devices at once: 4 + 4 new ids, room for 4 (one device exists already).
        await asyncio.wait_for(
            asyncio.gather(
                a([delivery(f"new-a{i}", float(i), now) for i in range(4)]),
                b([delivery(f"new-b{i}", float(i), now) for i in range(4)]),
            ),
            60,
        )
    devices = await db.fetch("SELECT id FROM devices WHERE tenant_id = $1 ORDER BY id", acme)
    assert len(devices) == 5
    stored = await db.fetchval("SELECT count(DISTINCT device_id) FROM telemetry")
    assert stored == 4
    letters = await db.fetch("SELECT device_id, reason, detail, tenant_id::text FROM ingest_rejects")
    assert len(letters) == 4
    assert {(r["reason"], r["tenant_id"]) for r in letters} == {("tenant_quota", acme)}
    assert letters[0]["detail"] == (
        f"device not registered: tenant 'acme-{unique}' has reached its limit of 5 devices"
    )
    registered = {r["id"] for r in devices} - {"acme-old"}
    assert registered.isdisjoint(r["device_id"] for r in letters)


async def test_dead_letters_belong_to_the_tenant_of_their_device_and_unknown_devices_to_none(
    writer: BatchWriter, db: asyncpg.Connection[Any], unique: str
) -> None:
    globex = await add_tenant(db, f"globex-{unique}")
    await db.execute("INSERT INTO devices (id, tenant_id) VALUES ('globex-1', $1)", globex)
    await writer._known.refresh(writer._pool)
    now = datetime.now(UTC).replace(microsecond=0)
    bad = Reject("invalid_value", "t: null")
    batch = [
        Delivery("devices/telemetry/good", "good", now, b"{}", rejects=[bad]),
        Delivery("devices/telemetry/globex-1", "globex-1", now, b"{}", rejects=[bad]),
        delivery("ghost", 1.0, now),
    ]
    await asyncio.wait_for(writer(batch), 60)
    rows = await db.fetch("SELECT device_id, reason, tenant_id::text FROM ingest_rejects ORDER BY device_id")
    assert [tuple(r) for r in rows] == [
        ("ghost", "unknown_device", None),
        ("globex-1", "invalid_value", globex),
        ("good", "invalid_value", str(DEFAULT_TENANT_ID)),
    ]


async def test_a_tenants_readings_limit_holds_over_the_replicas_together(
    database_url: str, redis: aioredis.Redis, db: asyncpg.Connection[Any], unique: str
) -> None:
    acme = await add_tenant(db, f"acme-{unique}", max_readings_per_s=1000)
    free = await add_tenant(db, f"free-{unique}")
    await db.execute(
        "INSERT INTO devices (id, tenant_id) SELECT 'a' || i, $1 FROM generate_series(0, 9) AS i", acme
    )
    await db.execute("INSERT INTO devices (id, tenant_id) VALUES ('f0', $1)", free)
    names = RedisNames(f"store{unique}")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    async with replicas(database_url, redis, names, 3, "default") as writers:
        # 3 replicas x 800 readings of acme (400 messages of 2), and as many of a tenant without limit,
        # within one second of the clock (the test retries the rare run that straddles two seconds).
        for _ in range(5):
            second = int(time.time())
            batches = [
                [
                    Delivery(
                        f"devices/telemetry/{device}",
                        device,
                        start,
                        b"[]",
                        readings=[
                            Reading(device, start + timedelta(milliseconds=k * 2 + j), {"t": 1.0})
                            for j in (0, 1)
                        ],
                    )
                    for k in range(400 * w, 400 * (w + 1))
                    for device in (f"a{k % 10}", "f0")
                ]
                for w in range(3)
            ]
            await asyncio.wait_for(asyncio.gather(*(w(b) for w, b in zip(writers, batches, strict=True))), 60)
            if int(time.time()) == second:
                break
            # Straddled two seconds: start again from nothing, the counters of those seconds too (the next
            # attempt may fall in the second this one ended in, whose counter is already spent).
            await db.execute("TRUNCATE telemetry, ingest_rejects")
            pattern = names.tenant_rate_key(acme, 0).removesuffix("0") + "*"
            counters = [key async for key in redis.scan_iter(match=pattern)]
            if counters:
                await redis.delete(*counters)
        else:
            pytest.skip("every run straddled two seconds of the clock (a very slow machine)")
    acme_rows = await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id LIKE 'a%'")
    assert acme_rows == 1000
    assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = 'f0'") == 2400
    refused = await db.fetch("SELECT reason, tenant_id::text AS tenant, detail FROM ingest_rejects")
    assert len(refused) == (2400 - 1000) // 2
    assert {(r["reason"], r["tenant"]) for r in refused} == {("tenant_quota", acme)}
    assert refused[0]["detail"].startswith(f"tenant 'acme-{unique}' over its limit of 1000 readings/s")


async def test_without_the_tenant_auto_registration_names_unknown_devices_are_dead_letters_saying_so(
    database_url: str, redis: aioredis.Redis, db: asyncpg.Connection[Any], unique: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with capture_logs() as logs:
        async with replicas(database_url, redis, RedisNames(f"store{unique}"), 1, f"nobody-{unique}") as (w,):
            await asyncio.wait_for(w([delivery(f"new-{unique}", 1.0, now)]), 60)
    assert await db.fetchval("SELECT count(*) FROM devices WHERE id = $1", f"new-{unique}") == 0
    letter = await db.fetchrow("SELECT reason, detail, tenant_id FROM ingest_rejects")
    assert tuple(letter) == (
        "unknown_device",
        f"device 'new-{unique}' is not registered: no tenant 'nobody-{unique}' to register it in",
        None,
    )
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "IOT_INGEST_AUTO_REGISTER_TENANT names no tenant: unknown devices are not registered"
    ]


async def test_outcomes_tell_the_waiting_sender_what_was_stored_and_why_not(
    writer: BatchWriter, db: asyncpg.Connection[Any]
) -> None:
    """HTTP ingest's answer: the writer fills each delivery's outcome from the committed transaction."""
    now = datetime.now(UTC).replace(microsecond=0)
    stored, unknown, broken, storing_failed = Outcome(), Outcome(), Outcome(), Outcome()
    batch = [
        Delivery(
            "/ingest/v1/devices/good/telemetry",
            "good",
            now,
            b"[]",
            [Reading("good", now, {"t": 1.0}), Reading("good", now + timedelta(seconds=1), {"t": 2.0})],
            [Reject("invalid_value", "[2] t: x")],
            outcome=stored,
        ),
        Delivery("/p", "ghost", now, b"{}", [Reading("ghost", now, {"t": 1.0})], outcome=unknown),
        Delivery("/p", "good", now, b"{", rejects=[Reject("malformed_json", "x")], outcome=broken),
        Delivery("/p", "odd", now, b"{}", [Reading("odd", now, {"t": object()})], outcome=storing_failed),
    ]
    await asyncio.wait_for(writer(batch), 60)
    assert (stored.stored, stored.refusal) == (2, None)
    assert unknown.stored == 0
    assert unknown.refusal is not None
    assert unknown.refusal.reason == "unknown_device"
    assert (broken.stored, broken.refusal) == (0, Reject("malformed_json", "x"))
    assert storing_failed.stored == 0
    assert storing_failed.refusal is not None
    assert storing_failed.refusal.reason == "handler_error"
    assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = 'good'") == 2
    reasons = await db.fetch("SELECT reason FROM ingest_rejects ORDER BY reason")
    assert [r["reason"] for r in reasons] == [
        "handler_error",
        "invalid_value",
        "malformed_json",
        "unknown_device",
    ]
    # Posted again (an answer lost, or a 503 after which it was committed all the same): stored once.
    again = Outcome()
    await writer([Delivery("/p", "good", now, b"[]", batch[0].readings, outcome=again)])
    assert again.stored == 2
    assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = 'good'") == 2


async def _online_writer(
    database_url: str, redis: aioredis.Redis, unique: str, came_online: list[list[str]]
) -> tuple[BatchWriter, asyncpg.Pool[Any]]:
    pool = await create_pool(database_url, min_size=1, max_size=2)
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    writer = BatchWriter(
        pool,
        known,
        RedisOutput(redis, RedisNames(f"touch{unique}")),
        auto_register=False,
        on_online=lambda devices, _task: came_online.append(devices),
    )
    return writer, pool


@pytest.mark.parametrize("late", [False, True], ids=["recent", "late"])
async def test_a_batch_of_readings_moves_last_seen_forward_only_and_wakes_offline_devices(
    database_url: str, db: asyncpg.Connection[Any], redis: aioredis.Redis, unique: str, late: bool
) -> None:
    """The ordinary batch (readings only) writes its devices' last-seen time and status in the telemetry
    statement: ``last_seen`` never goes back, a device marked ``offline`` is ``online`` again and reported
    as come online, and a redelivered reading is counted once; readings older than the rollups' cutoff
    (``late``) take the statement that also marks their minutes."""
    now = datetime.now(UTC).replace(microsecond=0)
    stamp = now - timedelta(hours=2) if late else now
    ids = {k: f"{k}-{unique}" for k in ("sleeper", "ahead", "behind", "awake")}
    await db.executemany(
        "INSERT INTO devices (id, status, last_seen) VALUES ($1, $2, $3)",
        [
            (ids["sleeper"], "offline", now - timedelta(hours=1)),
            (ids["ahead"], "offline", now + timedelta(minutes=10)),  # a clock ahead: stays where it is
            (ids["behind"], "online", now - timedelta(minutes=5)),
            (ids["awake"], "online", now + timedelta(minutes=10)),
        ],
    )
    came_online: list[list[str]] = []
    writer, pool = await _online_writer(database_url, redis, unique, came_online)

    def reading(key: str, seconds: int, value: float = 1.0) -> Delivery:
        ts = stamp + timedelta(seconds=seconds)
        received = now + timedelta(seconds=seconds)
        return Delivery(
            "devices/telemetry/x", ids[key], received, b"{}", readings=[Reading(ids[key], ts, {"t": value})]
        )

    first = [reading(key, 0) for key in ids] + [reading("behind", 1)]
    try:
        await writer(first)
        # Redelivered with a new reading: only the new one is a new row, and nobody comes online twice.
        plan = await writer._commit_with_retry([*first, reading("sleeper", 2)])
        await writer.drain()
    finally:
        await pool.close()
    assert came_online == [sorted([ids["sleeper"], ids["ahead"]])]
    assert plan.new_rows == 1
    assert plan.fresh == {(ids["sleeper"], stamp + timedelta(seconds=2))}
    assert plan.came_online == []
    rows = {
        r["id"]: (r["status"], r["last_seen"])
        for r in await db.fetch(
            "SELECT id, status, last_seen FROM devices WHERE id = ANY($1::text[])", list(ids.values())
        )
    }
    assert rows == {
        ids["sleeper"]: ("online", now + timedelta(seconds=2)),
        ids["ahead"]: ("online", now + timedelta(minutes=10)),
        ids["behind"]: ("online", now + timedelta(seconds=1)),
        ids["awake"]: ("online", now + timedelta(minutes=10)),
    }
    marks = await db.fetchval(
        "SELECT count(*) FROM telemetry_rollup_dirty WHERE device_id = ANY($1::text[])", list(ids.values())
    )
    assert (marks > 0) == late


async def test_a_status_message_in_the_batch_decides_its_devices_status_over_its_readings(
    database_url: str, db: asyncpg.Connection[Any], redis: aioredis.Redis, unique: str
) -> None:
    """A device with a status message and readings in one batch takes the status message's status (its
    last one), while a device with only readings wakes up: the batch's devices are written as before."""
    now = datetime.now(UTC).replace(microsecond=0)
    ids = {k: f"{k}-{unique}" for k in ("leaving", "waking")}
    await db.executemany(
        "INSERT INTO devices (id, status, last_seen) VALUES ($1, 'offline', $2)",
        [(ids["leaving"], now - timedelta(hours=1)), (ids["waking"], now - timedelta(hours=1))],
    )
    came_online: list[list[str]] = []
    writer, pool = await _online_writer(database_url, redis, unique, came_online)
    readings = [
        Delivery("devices/telemetry/x", i, now, b"{}", readings=[Reading(i, now, {"t": 1.0})])
        for i in ids.values()
    ]
    will = Delivery(
        "devices/status/x", ids["leaving"], now + timedelta(seconds=1), b"offline", status="offline"
    )
    try:
        await writer([*readings, will])
        await writer.drain()
    finally:
        await pool.close()
    assert came_online == [[ids["waking"]]]
    rows = dict(
        await db.fetch("SELECT id, status FROM devices WHERE id = ANY($1::text[])", list(ids.values()))
    )
    assert rows == {ids["leaving"]: "offline", ids["waking"]: "online"}


class _LoseAfterStatement:
    """A connection that runs each statement and then reports itself lost, as when the connection to
    PostgreSQL breaks after the commit but before its answer arrives."""

    def __init__(self, conn: Any, lost: list[bool]) -> None:
        self._conn = conn
        self._lost = lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        await self._conn.fetchrow(query, *args)
        self._lost.append(True)
        raise asyncpg.ConnectionDoesNotExistError("connection lost after the statement ran")


class _FirstConnectionLosesItsAnswer:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self._pool = pool
        self.lost: list[bool] = []

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self._pool.acquire() as conn:
            yield conn if self.lost else _LoseAfterStatement(conn, self.lost)


async def test_a_batch_retried_after_a_commit_it_did_not_hear_of_still_publishes_its_readings(
    database_url: str, db: asyncpg.Connection[Any], redis: aioredis.Redis, unique: str
) -> None:
    """The first attempt's statement commits, then the connection is lost before the answer: the retry
    finds the rows already there. They were stored by this batch and never published, so they are
    published now (before, WebSocket clients never got them)."""
    device = f"ambiguous-{unique}"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device)
    pool = await create_pool(database_url, min_size=1, max_size=2)
    flaky = _FirstConnectionLosesItsAnswer(pool)
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    writer = BatchWriter(
        flaky,  # type: ignore[arg-type]
        known,
        RedisOutput(redis, RedisNames(f"ambiguous{unique}")),
        auto_register=False,
        retry_initial_s=0.01,
        retry_max_s=0.05,
    )
    now = datetime.now(UTC).replace(microsecond=0)
    batch = [delivery(device, i, now + timedelta(seconds=i)) for i in range(3)]
    try:
        plan = await writer._commit_with_retry(batch)
        await writer.drain()
    finally:
        await pool.close()
    assert flaky.lost == [True]
    assert plan.new_rows == 0  # the retry found every row stored by the first attempt
    assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", device) == 3
    assert [r.ts for r in plan.published()] == [now + timedelta(seconds=i) for i in range(3)]


@pytest.mark.parametrize("pool_kind", ["writer's pool", "default pool"])
async def test_the_writers_pool_writes_an_ordinary_batch_in_one_round_trip(
    database_url: str, db: asyncpg.Connection[Any], redis: aioredis.Redis, unique: str, pool_kind: str
) -> None:
    """Ingest's writer pool keeps its connection as it is between batches: an ordinary batch is its one
    statement, without the reset query asyncpg's default pool runs on every release (the other case)."""
    device = f"trips-{unique}"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device)
    if pool_kind == "writer's pool":
        pool = await create_writer_pool(database_url)
    else:
        pool = await create_pool(database_url, min_size=1, max_size=1)
    statements: list[str] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda record: statements.append(record.query))
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    writer = BatchWriter(pool, known, RedisOutput(redis, RedisNames(f"trips{unique}")), auto_register=False)
    now = datetime.now(UTC)
    try:
        for i in range(3):
            statements.clear()
            await writer._commit_with_retry([delivery(device, i, now + timedelta(seconds=i))])
            if i == 0:
                continue  # the first use of the statement also asks for its types
            if pool_kind == "writer's pool":
                assert len(statements) == 1, statements
                assert "INSERT INTO telemetry" in statements[0]
            else:
                assert len(statements) == 2, statements
                assert "RESET ALL" in statements[1]
        await writer.drain()
    finally:
        await pool.close()
    assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", device) == 3


class _CountingConnection(aioredis.Connection):
    """A Redis connection that counts what it sends: one call per command or per pipeline."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


async def test_the_redis_step_of_a_batch_is_one_round_trip_and_publishes_its_readings(
    database_url: str, db: asyncpg.Connection[Any], redis_url: str, unique: str
) -> None:
    """A batch's latest values and events go to Redis in one pipeline, sent once: before, redis-py asked
    ``SCRIPT EXISTS`` before each pipeline holding its scripts, a second round trip per batch."""
    device = f"rtrips-{unique}"
    names = RedisNames(f"rtrips{unique}")
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device)
    counting = aioredis.Redis(
        connection_pool=aioredis.ConnectionPool.from_url(redis_url, connection_class=_CountingConnection)
    )
    listener = aioredis.from_url(redis_url)
    pubsub = listener.pubsub()
    await subscribe_confirmed(pubsub, names.device_channel(DEFAULT_TENANT_ID, device))
    pool = await create_writer_pool(database_url)
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    writer = BatchWriter(pool, known, RedisOutput(counting, names), auto_register=False)
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        for i in range(3):
            _CountingConnection.sends = 0
            await writer([delivery(device, i, now + timedelta(seconds=i))])
            await writer.drain()
            if i == 0:
                continue  # the first batch also opens the connection (its handshake)
            assert _CountingConnection.sends == 1, f"batch {i}: {_CountingConnection.sends} sends"
        received = []
        for _ in range(3):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None
            received.append(message["data"])
        latest = await listener.hget(names.latest_key(device), "t")
    finally:
        await pool.close()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await listener.aclose()
        await counting.aclose()
    assert all(f'"t":{i}'.encode() in m for i, m in enumerate(received)), received
    assert latest is not None
    assert b'"value":2' in latest, latest
