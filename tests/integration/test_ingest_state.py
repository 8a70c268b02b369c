"""Ingest's writer with state reports against the real database and Redis: reports merge in arrival order
in the batch transaction, an unchanged report makes no version, one that would make the reported state too
large is a dead letter, an unknown device's report is one, and the ``state`` event and the Redis copy follow
the commit (never going back to an older version)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from iot_common.db import create_pool
from iot_common.messages import StateEvent, decode_event, encode_event
from iot_common.state import MAX_STATE_BYTES, STATE_COPY_SCRIPT
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_ingest.consumer import translate
from iot_ingest.devices import KnownDevices
from iot_ingest.payload import Limits
from iot_ingest.plan import Delivery
from iot_ingest.redis_output import RedisOutput
from iot_ingest.writer import BatchWriter
from iot_testkit.channels import subscribe_confirmed

NOW = datetime.now(UTC)


@pytest.fixture
def names(unique: str) -> RedisNames:
    return RedisNames(f"state{unique}")


@pytest.fixture
async def writer(
    database_url: str, redis: aioredis.Redis, db: asyncpg.Connection[Any], names: RedisNames
) -> AsyncIterator[BatchWriter]:
    await db.execute("INSERT INTO devices (id) VALUES ('thermo'), ('other')")
    pool = await create_pool(database_url, min_size=1, max_size=2)
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    writer = BatchWriter(pool, known, RedisOutput(redis, names), auto_register=False, retry_initial_s=0.01)
    try:
        yield writer
    finally:
        await writer.drain()
        await pool.close()


def report(device_id: str, body: Any) -> Delivery:
    return translate(f"devices/state/{device_id}/reported", msgspec.json.encode(body), NOW, Limits())


async def test_reports_merge_in_order_and_publish_after_commit(
    writer: BatchWriter, db: asyncpg.Connection[Any], redis: aioredis.Redis, names: RedisNames
) -> None:
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, names.device_channel(DEFAULT_TENANT_ID, "thermo"))
    batch = [
        report("thermo", {"reported": {"a": 1, "b": {"c": 1}}, "version": 4}),
        report("other", {"reported": {"x": 1}}),
        report("thermo", {"reported": {"a": 2, "b": {"d": 2}}}),
        report("thermo", {"reported": {"a": 2}}),  # changes nothing: no version
        report("thermo", {"reported": {"big": "x" * (MAX_STATE_BYTES - 20)}}),  # too large once merged
        report("ghost", {"reported": {"a": 1}}),
        report("thermo", {"reported": "nope"}),
    ]
    await (await writer(batch))
    row = await db.fetchrow("SELECT reported, version FROM device_state WHERE device_id = 'thermo'")
    assert row is not None
    assert (row["reported"], row["version"]) == ({"a": 2, "b": {"c": 1, "d": 2}}, 2)
    history = await db.fetch(
        "SELECT version, side, patch, actor, applied_version FROM device_state_history"
        " WHERE device_id = 'thermo' ORDER BY version"
    )
    assert [(h["version"], h["actor"], h["applied_version"]) for h in history] == [
        (1, "device", 4),
        (2, "device", None),
    ]
    letters = await db.fetch("SELECT device_id, reason FROM ingest_rejects ORDER BY device_id")
    assert sorted((r["device_id"], r["reason"]) for r in letters) == [
        ("ghost", "unknown_device"),
        ("thermo", "invalid_state_report"),
        ("thermo", "state_too_large"),
    ]
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message is not None
    assert decode_event(message["data"]) == StateEvent("thermo", {}, row["reported"], {}, 2)
    copy = await redis.hget(names.state_key("thermo"), "event")
    assert copy is not None
    assert decode_event(copy) == StateEvent("thermo", {}, row["reported"], {}, 2)
    # An older version arriving late changes neither the copy nor the channel.
    older = encode_event(StateEvent("thermo", {}, {"a": 0}, {}, 1))
    channel = names.device_channel(DEFAULT_TENANT_ID, "thermo")
    assert await redis.eval(STATE_COPY_SCRIPT, 1, names.state_key("thermo"), "1", older, channel) == 0  # type: ignore[misc]
    assert await redis.hget(names.state_key("thermo"), "event") == copy
    await pubsub.aclose()
