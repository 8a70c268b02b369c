"""The ingest writer against a real PostgreSQL: one message that cannot be stored never holds the batch.

Before, a fault on one message that was not a PostgreSQL data error (here, a value the code cannot turn
into a row) was retried as a whole batch for ever: no PUBACK for any message of the batch, and every later
batch waiting behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from iot_common.db import create_pool
from iot_common.messages import Reading
from iot_common.topics import RedisNames
from iot_ingest import writer as writer_module
from iot_ingest.devices import KnownDevices
from iot_ingest.plan import DeadLetter, Delivery
from iot_ingest.redis_output import RedisOutput
from iot_ingest.writer import BatchWriter


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
    def unstorable(d: Delivery, reason: Any, detail: str) -> DeadLetter:
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
