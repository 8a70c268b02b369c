"""The ingest service as a process, fed by a real MQTT publisher that records the broker's PUBACKs.

Every test uses a private Mosquitto (no other traffic, no queue limit) and its own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_testkit.channels import subscribe_confirmed
from iot_testkit.chaos import TcpProxy
from iot_testkit.loadgen import device_ids, publish_async, telemetry_payload
from iot_testkit.metrics import scrape
from iot_testkit.processes import ServiceProcess, Start, free_port, mosquitto
from iot_testkit.waiting import wait_for


class Ingest:
    """Starts ``iot-ingest`` processes against one database, broker, share group and Redis prefix (the
    group's name: replicas of other tests on the shared Redis are no members of this group)."""

    def __init__(self, start: Start, database_url: str, redis_url: str, mqtt_url: str, group: str) -> None:
        self._start = start
        self.names = RedisNames(group)
        self.env = {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_REDIS_PREFIX": group,
            "IOT_MQTT_URL": mqtt_url,
            "IOT_MQTT_SHARE_GROUP": group,
            "IOT_INGEST_BATCH_DELAY_MS": "20",
        }

    def start(self, client_id: str, **env: str) -> tuple[ServiceProcess, str]:
        port = free_port()
        proc = self._start(
            "iot-ingest",
            {**self.env, "IOT_MQTT_CLIENT_ID": client_id, "IOT_INGEST_HTTP_PORT": str(port), **env},
        )
        base = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{base}/readyz")
        return proc, base


async def register(db: asyncpg.Connection[Any], ids: list[str]) -> None:
    await db.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", ids)


async def telemetry_rows(db: asyncpg.Connection[Any]) -> int:
    return int(await db.fetchval("SELECT count(*) FROM telemetry"))


async def assert_exactly(
    db: asyncpg.Connection[Any], devices: list[str], seqs: list[int], base_ms: int
) -> None:
    """The stored readings are exactly the messages ``seqs`` of a load run: 3 rows each, no other."""
    rows = await db.fetch(
        "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint - $1 AS seq, count(*) AS n "
        "FROM telemetry GROUP BY 1, 2",
        base_ms,
    )
    stored = {int(r["seq"]): (r["device_id"], r["n"]) for r in rows}
    missing = sorted(set(seqs) - set(stored))
    assert not missing, f"{len(missing)} acknowledged messages not stored, e.g. {missing[:10]}"
    for seq in seqs:
        assert stored[seq] == (devices[seq % len(devices)], 3), seq


@pytest.fixture
def broker() -> Any:
    with mosquitto() as url:
        yield url


@pytest.fixture
def ingest(service: Start, database_url: str, redis_url: str, broker: str, unique: str) -> Ingest:
    return Ingest(service, database_url, redis_url, broker, f"ingest-{unique}")


async def test_valid_and_invalid_messages_stored_and_dead_lettered(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str
) -> None:
    known = [f"dev-{unique}-a", f"dev-{unique}-b"]
    await register(db, known)
    _, base = ingest.start(f"ingest-{unique}")
    now_ms = int(time.time() * 1000)
    valid = [
        (f"devices/telemetry/{known[i % 2]}", b'{"ts": %d, "metrics": {"t": %d}}' % (now_ms - 10_000 + i, i))
        for i in range(40)
    ] + [(f"devices/telemetry/{known[0]}", b'{"temperature": 21.5, "ok": true, "state": "ok"}')]
    invalid = {
        "malformed_json": (f"devices/telemetry/{known[0]}", b"{not json"),
        "non_finite_value": (f"devices/telemetry/{known[0]}", b'{"t": NaN}'),
        "invalid_metric_name": (f"devices/telemetry/{known[0]}", b'{"9lives": 1}'),
        "too_many_metrics": (
            f"devices/telemetry/{known[0]}",
            json.dumps({f"m{i}": i for i in range(101)}).encode(),
        ),
        "payload_too_large": (f"devices/telemetry/{known[0]}", b'{"t": "%s"}' % (b"x" * 70000)),
        "timestamp_in_future": (
            f"devices/telemetry/{known[1]}",
            b'{"ts": %d, "t": 1}' % (now_ms + 86_400_000),
        ),
        "timestamp_too_old": (f"devices/telemetry/{known[1]}", b'{"ts": "2001-01-01T00:00:00Z", "t": 1}'),
        "unknown_device": (f"devices/telemetry/ghost-{unique}", b'{"t": 1}'),
        "invalid_status": (f"devices/status/{known[0]}", b"sleepy"),
    }
    messages = valid + list(invalid.values())
    result = await publish_async(
        broker,
        [t for t, _ in messages],
        len(messages),
        payload=lambda seq, _: messages[seq][1],
        topic_prefix="",
    )
    assert result.acked == len(messages)

    async def done() -> bool:
        stored = await db.fetchval("SELECT count(DISTINCT (device_id, ts)) FROM telemetry")
        letters = await db.fetchval("SELECT count(*) FROM ingest_rejects")
        return bool(stored == len(valid) and letters == len(invalid))

    await wait_for(done, 30, "readings and dead letters")
    letters = await db.fetch(
        "SELECT reason, topic, device_id, detail, payload, payload_size FROM ingest_rejects"
    )
    assert sorted(r["reason"] for r in letters) == sorted(invalid)
    by_reason = {r["reason"]: r for r in letters}
    assert by_reason["unknown_device"]["device_id"] == f"ghost-{unique}"
    assert by_reason["malformed_json"]["payload"] == "{not json"
    assert by_reason["payload_too_large"]["payload_size"] > 70000
    assert len(by_reason["payload_too_large"]["payload"]) <= 1024
    assert all(r["detail"] for r in letters)
    text = await db.fetchrow("SELECT value, value_text FROM telemetry WHERE metric = 'state'")
    assert (text["value"], text["value_text"]) == (None, "ok")
    seen = await db.fetch("SELECT last_seen FROM devices WHERE id = ANY($1::text[])", known)
    assert all(r["last_seen"] is not None for r in seen)
    metrics = scrape(base)
    for reason in invalid:
        assert metrics[f"iot_ingest_rejected_total{{reason={reason}}}"] == 1, reason
    assert metrics["iot_ingest_readings_stored_total"] == len(valid)


async def test_many_messages_wait_in_one_batch_and_are_acknowledged_after_commit(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str
) -> None:
    """gmqtt runs handlers concurrently: 200 messages fill one batch; SIGTERM flushes the partial next one."""
    devices = device_ids(f"b-{unique}", 4)
    await register(db, devices)
    proc, base = ingest.start(
        f"ingest-{unique}", IOT_INGEST_BATCH_SIZE="200", IOT_INGEST_BATCH_DELAY_MS="60000"
    )
    result = await publish_async(broker, devices, 200)
    assert result.acked == 200
    await wait_for(lambda: _eq(telemetry_rows(db), 600), 30, "one full batch")
    metrics = scrape(base)
    assert metrics["iot_ingest_batch_size_count"] == 1
    assert metrics["iot_ingest_batch_size_sum"] == 200
    # Five more cannot fill a batch and the delay is a minute: they wait, unacknowledged.
    await publish_async(broker, devices, 5, base_ms=result.started_at * 1000 + 10_000)
    await wait_for(lambda: scrape(base)["iot_ingest_in_flight"] == 5, 30, "5 in flight")
    assert await telemetry_rows(db) == 600
    assert proc.stop() == 0, proc.logs()
    assert await telemetry_rows(db) == 615


async def _eq(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_sigkill_mid_stream_then_restart_stores_every_acknowledged_reading_once(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str
) -> None:
    devices = device_ids(f"k-{unique}", 20)
    await register(db, devices)
    client_id = f"ingest-{unique}"
    proc, _ = ingest.start(client_id)
    killed = asyncio.Event()

    def progress(sent: int) -> None:
        if sent == 8000 and not killed.is_set():
            proc.kill()
            killed.set()

    base_ms = int(time.time() * 1000) - 30_000
    publishing = asyncio.create_task(
        publish_async(broker, devices, 20000, base_ms=base_ms, rate=4000, on_progress=progress)
    )
    await asyncio.wait_for(killed.wait(), 60)
    stored_at_kill = await telemetry_rows(db)
    await asyncio.to_thread(ingest.start, client_id)
    result = await publishing
    assert result.acked == result.sent == 20000
    await wait_for(lambda: _eq(telemetry_rows(db), 3 * result.acked), 60, "every acknowledged reading")
    await assert_exactly(db, devices, result.acked_seqs, base_ms)
    assert 0 < stored_at_kill < 3 * result.acked


@pytest.fixture
async def pg_proxy(database_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    yield proxy, urlunsplit(parts._replace(netloc=netloc))
    with contextlib.suppress(Exception):
        await proxy.cut()


async def test_postgres_unreachable_for_seconds_loses_and_duplicates_nothing(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str, pg_proxy: tuple[TcpProxy, str]
) -> None:
    proxy, proxied_url = pg_proxy
    devices = device_ids(f"p-{unique}", 10)
    await register(db, devices)
    # In a thread: the proxy runs in this event loop and must serve ingest's start-up.
    _, base = await asyncio.to_thread(ingest.start, f"ingest-{unique}", IOT_DATABASE_URL=proxied_url)
    cut = asyncio.Event()
    base_ms = int(time.time() * 1000) - 30_000

    def progress(sent: int) -> None:
        if sent == 4000:
            cut.set()

    publishing = asyncio.create_task(
        publish_async(broker, devices, 12000, base_ms=base_ms, rate=2000, on_progress=progress)
    )
    await asyncio.wait_for(cut.wait(), 60)
    await proxy.cut()
    await asyncio.sleep(4)  # the outage itself: PostgreSQL unreachable for this long
    during = scrape(base)
    assert during["iot_ingest_storage_retries_total"] > 0
    await proxy.start()
    result = await publishing
    assert result.acked == result.sent == 12000
    await wait_for(lambda: _eq(telemetry_rows(db), 3 * result.acked), 60, "every acknowledged reading")
    await assert_exactly(db, devices, result.acked_seqs, base_ms)
    # A COMMIT whose answer the cut swallowed was applied; its retry finds the rows and counts them as
    # duplicates. So every acknowledged row is counted once, as new or as duplicate, never twice.
    after = scrape(base)
    counted = after["iot_ingest_rows_stored_total"] + after["iot_ingest_rows_duplicate_total"]
    assert counted == 3 * result.acked


async def test_two_replicas_on_the_shared_subscription_split_the_load(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str
) -> None:
    devices = device_ids(f"s-{unique}", 10)
    await register(db, devices)
    _, base_a = ingest.start(f"ingest-{unique}-a")
    _, base_b = ingest.start(f"ingest-{unique}-b")
    base_ms = int(time.time() * 1000) - 30_000
    result = await publish_async(broker, devices, 10000, base_ms=base_ms)
    assert result.acked == 10000
    await wait_for(lambda: _eq(telemetry_rows(db), 30000), 60, "every reading")
    await assert_exactly(db, devices, result.acked_seqs, base_ms)
    a = scrape(base_a)["iot_ingest_readings_stored_total"]
    b = scrape(base_b)["iot_ingest_readings_stored_total"]
    assert a > 0
    assert b > 0
    assert a + b == 10000


async def test_reading_reaches_its_redis_channel_and_latest_hash_newest_value_wins(
    ingest: Ingest, db: asyncpg.Connection[Any], redis: aioredis.Redis, broker: str, unique: str
) -> None:
    device = f"r-{unique}"
    await register(db, [device])
    ingest.start(f"ingest-{unique}")
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, ingest.names.device_channel(DEFAULT_TENANT_ID, device))
    now_ms = int(time.time() * 1000)
    newer = b'{"ts": %d, "metrics": {"temperature": 22.5, "state": "ok"}}' % now_ms
    older = b'{"ts": %d, "metrics": {"temperature": 10.0, "humidity": 40}}' % (now_ms - 60_000)
    await publish_async(broker, [device], 1, payload=lambda *_: newer)
    event = None
    deadline = time.monotonic() + 30
    while event is None and time.monotonic() < deadline:
        event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    assert event is not None, "no event on the device channel"
    body = json.loads(event["data"])
    assert body["type"] == "telemetry"
    assert body["device_id"] == device
    assert body["metrics"] == {"temperature": 22.5, "state": "ok"}
    latest = await redis.hgetall(ingest.names.latest_key(device))
    assert json.loads(latest[b"temperature"])["value"] == 22.5
    # An older reading arriving later is stored and published, but does not overwrite newer latest values.
    await publish_async(broker, [device], 1, payload=lambda *_: older)
    event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
    assert event is not None
    latest = await redis.hgetall(ingest.names.latest_key(device))
    assert json.loads(latest[b"temperature"])["value"] == 22.5
    assert json.loads(latest[b"humidity"])["value"] == 40.0
    assert await telemetry_rows(db) == 4
    # A will-style status message updates the device and is published for the realtime service.
    await publish_async(broker, [device], 1, payload=lambda *_: b"offline", topic_prefix="devices/status/")
    event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
    assert event is not None
    assert json.loads(event["data"])["status"] == "offline"
    assert await db.fetchval("SELECT status FROM devices WHERE id = $1", device) == "offline"
    await pubsub.aclose()
    await redis.delete(ingest.names.latest_key(device))


async def test_auto_register_accepts_unknown_devices(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str
) -> None:
    ingest.start(f"ingest-{unique}", IOT_INGEST_AUTO_REGISTER="true")
    devices = device_ids(f"auto-{unique}", 3)
    result = await publish_async(broker, devices, 30)
    assert result.acked == 30
    await wait_for(lambda: _eq(telemetry_rows(db), 90), 30, "readings of new devices")
    ids = await db.fetch("SELECT id FROM devices ORDER BY id")
    assert [r["id"] for r in ids] == devices
    assert await db.fetchval("SELECT count(*) FROM ingest_rejects") == 0


def test_payload_is_what_the_benchmark_sends() -> None:
    assert json.loads(telemetry_payload(7, 1000)) == {
        "ts": 1007,
        "metrics": {"temperature": 20.7, "humidity": 37, "seq": 7},
    }
