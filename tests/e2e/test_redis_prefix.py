"""Two deployments on one Redis server (issue 13, finding 9): with their own ``IOT_REDIS_PREFIX``, a reading
of one, or anything published under its names, never reaches the other's WebSocket clients or latest values.

Redis pub/sub ignores the database number, so the prefix is what keeps them apart.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from iot_testkit.loadgen import publish_async
from iot_testkit.processes import Start, mosquitto
from tests.e2e.realtime_support import (
    DEFAULT,
    assert_nothing_pending,
    open_ws,
    recv_json,
    register,
    start_realtime,
    subscribe,
    telemetry,
    token,
)
from tests.e2e.test_ingest import Ingest


async def test_a_reading_of_one_deployment_never_reaches_the_other_sharing_its_redis(
    service: Start, database_url: str, redis_url: str, redis: aioredis.Redis, unique: str
) -> None:
    dev = f"dev-{unique}"
    await register(database_url, dev)
    ours = start_realtime(service, database_url, redis_url, {"IOT_REDIS_PREFIX": f"a{unique}"})
    theirs = start_realtime(service, database_url, redis_url, {"IOT_REDIS_PREFIX": f"b{unique}"})
    with mosquitto() as broker:
        ingest = Ingest(service, database_url, redis_url, broker, f"ingest-{unique}")
        ingest.start(f"ingest-{unique}", IOT_REDIS_PREFIX=f"a{unique}")
        async with (
            open_ws(ours.url(token())) as our_device,
            open_ws(ours.url(token())) as our_all,
            open_ws(theirs.url(token())) as their_device,
            open_ws(theirs.url(token())) as their_all,
        ):
            for ws in (our_device, their_device):
                await subscribe(ws, 1, [dev])
            for ws in (our_all, their_all):
                await subscribe(ws, 1, ["*"])
            # A reading through our ingest: our clients get it, theirs do not.
            reading = b'{"ts": %d, "metrics": {"temperature": 21.5}}' % int(time.time() * 1000)
            await publish_async(broker, [dev], 1, payload=lambda *_: reading)
            for ws in (our_device, our_all):
                frame = await recv_json(ws, timeout=30)
                assert (frame["type"], frame["device_id"], frame["metrics"]) == (
                    "telemetry",
                    dev,
                    {"temperature": 21.5},
                )
            await assert_nothing_pending(their_device)
            await assert_nothing_pending(their_all)
            # Their device channel has their subscriber only; ours has ours only.
            assert await redis.pubsub_numsub(
                ours.names.device_channel(DEFAULT, dev), theirs.names.device_channel(DEFAULT, dev)
            ) == [
                (ours.names.device_channel(DEFAULT, dev).encode(), 1),
                (theirs.names.device_channel(DEFAULT, dev).encode(), 1),
            ]
            # The latest values our ingest keeps are ours alone.
            assert await _latest(ours.url(token()), dev) == {"temperature": 21.5}
            assert await _latest(theirs.url(token()), dev) == {}
            # And the other way round: what is published under their names reaches only their clients.
            event = telemetry(dev, humidity=40.0)
            # Their process listens on the channel and on the pattern: two receivers, both theirs.
            assert await redis.publish(theirs.names.device_channel(DEFAULT, dev), event) == 2
            for ws in (their_device, their_all):
                assert await asyncio.wait_for(ws.recv(), 10) == event.decode()
            await assert_nothing_pending(our_device)
            await assert_nothing_pending(our_all)
    await redis.delete(ours.names.latest_key(dev))


async def _latest(url: str, dev: str) -> Any:
    async with open_ws(url) as ws:
        frames = await subscribe(ws, 1, [dev])
    assert frames[0]["type"] == "latest", frames
    return {name: value["value"] for name, value in frames[0]["metrics"].items()}
