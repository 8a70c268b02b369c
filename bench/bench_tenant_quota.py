"""Cost of the tenants' readings limit on ingest's write path: ``TenantQuota.apply`` per reading.

The writer calls it once per batch, before the commit: with no tenant limited it returns at once; with a
limited tenant in the batch it sums the batch's readings per tenant, sends one Redis pipeline (``INCRBY``
and ``EXPIRE`` per tenant) and walks the batch to admit or refuse each message. Measured here against the
local Redis (``IOT_TEST_REDIS_URL``), with batches of ``--batch`` messages of one reading over 100 devices
of one tenant: process CPU time per reading, and wall time per batch (the time a commit waits for Redis).

    uv run python bench/bench_tenant_quota.py [--batch 2000] [--batches 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime

from iot_common.messages import Reading
from iot_common.topics import RedisNames
from iot_ingest.devices import KnownDevices, TenantLimits
from iot_ingest.plan import Delivery
from iot_ingest.tenant_quota import TenantQuota, quota_client

REDIS = os.environ.get("IOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def measure(batch_size: int, batches: int) -> None:
    client = quota_client(REDIS)
    quota = TenantQuota(client, RedisNames(f"bench{uuid.uuid4().hex[:6]}"))
    tenant = str(uuid.uuid4())
    known = KnownDevices()
    known.tenants = {f"d{i}": tenant for i in range(100)}
    now = datetime.now(UTC)
    metrics = {"temperature": 21.5, "humidity": 40.0, "pressure": 1013.0}
    batch = [
        Delivery(
            f"devices/telemetry/d{i % 100}", f"d{i % 100}", now, b"{}", [Reading(f"d{i % 100}", now, metrics)]
        )
        for i in range(batch_size)
    ]
    print(f"TenantQuota.apply, {batches} batches of {batch_size} messages (one reading each), Redis {REDIS}")
    try:
        for label, limit in (("no tenant limited", None), ("tenant limited", 10**12)):
            known.limits = {tenant: TenantLimits("bench", max_readings_per_s=limit)}
            for _ in range(20):  # warm up: connection, script caches
                await quota.apply(batch, known)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(batches):
                admitted = await quota.apply(batch, known)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            assert all(d.readings for d in admitted), "the limit is above what is sent: nothing refused"
            per_reading, per_batch = cpu / (batches * batch_size) * 1e6, wall / batches * 1e3
            print(f"{label:>18}: {per_reading:6.3f} us CPU per reading, {per_batch:6.3f} ms per batch")
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2000, help="messages per batch (IOT_INGEST_BATCH_SIZE)")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(measure(args.batch, args.batches))


if __name__ == "__main__":
    main()
