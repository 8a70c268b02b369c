"""Hostile devices against ``iot-ingest`` as a process, on a private Mosquitto and a database of its own.

One device credential floods poison messages (invalid UTF-8, JSON nested deeper than the recursion limit,
on the telemetry, status and command-ack topics) while another device publishes valid readings: before,
each poison message made the handler raise, so it was never acknowledged and held a slot of the broker's
in-flight window; 20,000 of them stopped ingestion for every device.

``IOT_TEST_POISON_MESSAGES`` sets the flood's size (default 20,000, the count of the report).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_testkit.channels import subscribe_confirmed
from iot_testkit.chaos import TcpProxy
from iot_testkit.loadgen import publish_async
from iot_testkit.metrics import scrape
from iot_testkit.waiting import wait_for
from tests.e2e.test_ingest import Ingest, broker, ingest, pg_proxy, register

__all__ = ["broker", "ingest", "pg_proxy"]  # fixtures used below

POISON_MESSAGES = int(os.environ.get("IOT_TEST_POISON_MESSAGES", "20000"))
VALID_READINGS = 200
AFTER_READINGS = 20
"""Published once the whole flood is in the broker: before, they waited behind poison holding every slot."""
VALID_RATE = 50.0
DEEP_ARRAY = b"[" * 1100 + b"]" * 1100
DEEP_OBJECT = b'{"a":' * 1100 + b"1" + b"}" * 1100


def poison_kinds(device: str) -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected reason) of each kind of poison message."""
    return [
        (f"devices/telemetry/{device}", b'{"s":"\xff"}', "malformed_json"),
        (f"devices/telemetry/{device}", DEEP_ARRAY, "too_deep"),
        (f"devices/status/{device}", b'{"status":"\xff"}', "malformed_json"),
        (f"devices/status/{device}", DEEP_OBJECT, "too_deep"),
        (f"devices/commands/{device}/ack", b'{"id":"\xff"}', "malformed_json"),
        (f"devices/commands/{device}/ack", DEEP_OBJECT, "too_deep"),
    ]


@pytest.mark.parametrize("quota", ["off", "on"])
async def test_a_poison_flood_from_one_device_is_dead_lettered_and_never_stalls_the_others(
    ingest: Ingest,
    db: asyncpg.Connection[Any],
    redis: aioredis.Redis,
    broker: str,
    unique: str,
    artifacts_dir: Path,
    quota: str,
) -> None:
    """Quota off: each poison message is a dead letter with its own reason, so the decoders alone cope.
    Quota on (100 messages/s, burst 2,000): past the burst they are ``rate_limited``, unparsed."""
    evil, good = f"evil-{unique}", f"good-{unique}"
    await register(db, [evil, good])
    limit = {"off": "0", "on": "100"}[quota]
    _, base = ingest.start(
        f"ingest-{unique}",
        IOT_INGEST_MAX_READINGS_PER_DEVICE_S=limit,
        IOT_INGEST_MAX_READINGS_PER_DEVICE_BURST="2000",
    )
    kinds = poison_kinds(evil)
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, ingest.names.device_channel(DEFAULT_TENANT_ID, good))
    delays_ms: list[float] = []

    async def listen() -> None:
        while len(delays_ms) < VALID_READINGS + AFTER_READINGS:
            event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if event is not None:
                body = json.loads(event["data"])
                if body["type"] == "telemetry":
                    delays_ms.append(time.time() * 1000 - body["metrics"]["sent_ms"])

    listener = asyncio.create_task(listen())
    began = time.monotonic()
    poisoned, valid = await asyncio.gather(
        publish_async(
            broker,
            [topic for topic, _, _ in kinds],
            POISON_MESSAGES,
            payload=lambda seq, _: kinds[seq % len(kinds)][1],
            topic_prefix="",
        ),
        publish_async(
            broker,
            [good],
            VALID_READINGS,
            rate=VALID_RATE,
            payload=lambda seq, _: b'{"sent_ms": %d, "seq": %d}' % (time.time() * 1000, seq),
        ),
    )
    assert poisoned.acked == POISON_MESSAGES
    assert valid.acked == VALID_READINGS
    after = await publish_async(
        broker,
        [good],
        AFTER_READINGS,
        payload=lambda seq, _: b'{"sent_ms": %d, "seq": %d}' % (time.time() * 1000, VALID_READINGS + seq),
    )
    assert after.acked == AFTER_READINGS

    async def valid_stored() -> bool:
        count = await db.fetchval("SELECT count(DISTINCT ts) FROM telemetry WHERE device_id = $1", good)
        return bool(count == VALID_READINGS + AFTER_READINGS)

    await wait_for(valid_stored, 60, "every valid reading stored")
    await asyncio.wait_for(listener, 30)
    await pubsub.aclose()

    async def all_dead_lettered() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM ingest_rejects") >= POISON_MESSAGES)

    await wait_for(all_dead_lettered, 60, "every poison message dead-lettered")
    elapsed_s = time.monotonic() - began
    rows = await db.fetch("SELECT reason, device_id, count(*) AS n FROM ingest_rejects GROUP BY 1, 2")
    found = {(r["reason"], r["device_id"]): r["n"] for r in rows}
    expected: dict[tuple[str, str], int] = {}
    for seq in range(POISON_MESSAGES):
        key = (kinds[seq % len(kinds)][2], evil)
        expected[key] = expected.get(key, 0) + 1
    if quota == "off":
        assert found == expected
    else:
        limited = found.pop(("rate_limited", evil), 0)
        # The bucket held 2,000 and refilled at 100/s while the flood was handled: the rest was refused.
        assert limited >= POISON_MESSAGES - 2000 - 100 * elapsed_s
        assert set(found) <= set(expected)
        assert sum(found.values()) + limited == POISON_MESSAGES

    # Nothing is left in flight: every message the broker took was acknowledged by ingest.
    async def drained() -> bool:
        return scrape(base)["iot_ingest_in_flight"] == 0

    await wait_for(drained, 30, "no message in flight")
    metrics = scrape(base)
    received = sum(v for k, v in metrics.items() if k.startswith("iot_ingest_messages_received_total"))
    assert received == POISON_MESSAGES + VALID_READINGS + AFTER_READINGS
    ready = await asyncio.to_thread(httpx.get, f"{base}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    summary = {
        "quota": quota,
        "poison_messages": POISON_MESSAGES,
        "poison_publish_s": round(poisoned.elapsed_s, 2),
        "all_dead_lettered_s": round(elapsed_s, 2),
        "valid_readings": VALID_READINGS + AFTER_READINGS,
        "valid_delay_ms_p50": round(statistics.median(delays_ms), 1),
        "valid_delay_ms_max": round(max(delays_ms), 1),
    }
    (artifacts_dir / f"poison_flood_{quota}.json").write_text(json.dumps(summary, indent=2))
    print(summary)


async def test_retained_telemetry_is_a_dead_letter_not_a_reading_on_each_start(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str
) -> None:
    device = f"ret-{unique}"
    await register(db, [device])
    retained = await publish_async(broker, [device], 1, payload=lambda *_: b'{"t": 1}', retain=True)
    assert retained.acked == 1
    proc, _ = ingest.start(f"ingest-{unique}")

    async def letters(count: int) -> bool:
        found = await db.fetchval("SELECT count(*) FROM ingest_rejects WHERE reason = 'retained'")
        return bool(found == count)

    await wait_for(lambda: letters(1), 30, "a retained dead letter")
    assert proc.stop() == 0
    # A new process subscribes again and gets the retained message again: again a dead letter only.
    _, base = ingest.start(f"ingest-{unique}")
    await wait_for(lambda: letters(2), 30, "a second retained dead letter")
    # A message published live with the retain flag set is a new reading (the broker clears the flag).
    live = await publish_async(broker, [device], 1, payload=lambda *_: b'{"t": 2}', retain=True)
    assert live.acked == 1

    async def stored() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM telemetry") == 1)

    await wait_for(stored, 30, "the live reading")
    assert await db.fetchval("SELECT value FROM telemetry") == 2.0
    letter = await db.fetchrow("SELECT device_id, topic, payload FROM ingest_rejects LIMIT 1")
    assert (letter["device_id"], letter["topic"], letter["payload"]) == (
        device,
        f"devices/telemetry/{device}",
        '{"t": 1}',
    )
    assert scrape(base)["iot_ingest_in_flight"] == 0


async def test_readiness_fails_while_messages_are_stuck_in_flight_and_recovers(
    ingest: Ingest, db: asyncpg.Connection[Any], broker: str, unique: str, pg_proxy: tuple[TcpProxy, str]
) -> None:
    """Held by a PostgreSQL outage here; before, nothing in ``/readyz`` looked at messages in flight."""
    proxy, proxied_url = pg_proxy
    device = f"stuck-{unique}"
    await register(db, [device])
    # In a thread: the proxy runs in this event loop and must serve ingest's start-up.
    _, base = await asyncio.to_thread(
        ingest.start, f"ingest-{unique}", IOT_DATABASE_URL=proxied_url, IOT_INGEST_STUCK_AFTER_S="1"
    )
    await proxy.cut()
    assert (await publish_async(broker, [device], 5)).acked == 5

    async def in_flight_check() -> str:
        response = await asyncio.to_thread(httpx.get, f"{base}/readyz", timeout=5)
        return str(response.json()["checks"]["in_flight"])

    async def stuck() -> bool:
        return (await in_flight_check()).startswith("error:")

    await wait_for(stuck, 30, "/readyz reporting stuck messages")
    assert "5 messages unacknowledged" in await in_flight_check()
    await proxy.start()

    async def ready() -> bool:
        response = await asyncio.to_thread(httpx.get, f"{base}/readyz", timeout=5)
        return response.status_code == 200

    await wait_for(ready, 30, "/readyz ok again")
    assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", device) == 15
