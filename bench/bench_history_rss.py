"""Memory of ``iot-api`` under the history attack: one read credential asks three times at once for 100
devices x 10,000 raw points (``GET /api/v1/telemetry/history``).

Seeds a dedicated database (``iot_bench_history``, reused when already seeded): 100 devices with 10,000
points each of one metric (1 M rows). ``iot-api`` runs as a process on 127.0.0.1 with the given
environment; RSS is sampled every 20 ms from before the requests until all answered. Bounded: 3 requests
(or ``--requests``), each with a 180 s timeout.

Run: ``uv run python bench/bench_history_rss.py [--requests 3] [--keys 1] [--env IOT_X=Y ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from iot_common.db import connect
from iot_common.db.partitions import ensure_partitions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import api_process, database_url, migrated_database
from iot_testkit.measure import rss_mib
from iot_testkit.processes import free_port

DATABASE = "iot_bench_history"
SEED_VERSION = 1
DEVICES = 100
POINTS = 10_000
API_KEY = "iotk_benchhistory_" + "h" * 24


async def seed() -> tuple[datetime, datetime]:
    """Create and fill the database unless a previous run did; return the range holding the points."""
    conn = await connect(await migrated_database(DATABASE, fresh=False))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_seed (version int PRIMARY KEY, start timestamptz)"
        )
        start = await conn.fetchval("SELECT start FROM bench_seed WHERE version = $1", SEED_VERSION)
        if start is None:
            start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
            await conn.execute("TRUNCATE devices, telemetry CASCADE")
            await ensure_partitions(conn, start.date() - timedelta(days=1), start.date() + timedelta(days=7))
            await conn.execute(
                "INSERT INTO devices (id) SELECT format('hist-%s', lpad(i::text, 3, '0'))"
                " FROM generate_series(0, $1 - 1) i",
                DEVICES,
            )
            await conn.execute("SET synchronous_commit = off")
            await conn.execute(
                """
                INSERT INTO telemetry (device_id, metric, ts, value)
                SELECT format('hist-%s', lpad(d::text, 3, '0')), 'temp',
                       $1::timestamptz + s * interval '1 second', 20 + random()
                FROM generate_series(0, $2 - 1) d, generate_series(0, $3 - 1) s
                """,
                start,
                DEVICES,
                POINTS,
            )
            await conn.execute("ANALYZE")
            await conn.execute("INSERT INTO bench_seed VALUES ($1, $2)", SEED_VERSION, start)
        return start, start + timedelta(seconds=POINTS)
    finally:
        await conn.close()


async def attack(base: str, path: str, keys: list[str], requests: int) -> list[tuple[int, int, float]]:
    async def one(key: str) -> tuple[int, int, float]:
        began = time.monotonic()
        async with httpx.AsyncClient(timeout=180) as client:
            response = await client.get(base + path, headers={"X-API-Key": key})
        return response.status_code, len(response.content), time.monotonic() - began

    return await asyncio.gather(*(one(keys[i % len(keys)]) for i in range(requests)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1, help="spread the requests over this many keys")
    parser.add_argument("--env", action="append", default=[], help="extra IOT_* settings of iot-api")
    args = parser.parse_args()
    start, stop = asyncio.run(seed())
    env = {
        "IOT_DATABASE_URL": database_url(DATABASE),
        "IOT_REDIS_URL": "redis://127.0.0.1:6379/0",
        "IOT_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",  # no broker: commands are not measured
        "IOT_API_CACHE_NAMESPACE": f"bench-hist-{uuid.uuid4().hex[:8]}:",
        "IOT_BOOTSTRAP_API_KEY": API_KEY,
        **dict(item.split("=", 1) for item in args.env),
    }
    with api_process(env, timeout=60) as api:
        base = api.base
        keys = [API_KEY]
        for _ in range(args.keys - 1):
            made = httpx.post(
                f"{base}/api/v1/api-keys",
                json={"name": "bench", "scopes": ["read"]},
                headers={"X-API-Key": API_KEY},
            ).json()
            keys.append(made["key"])
        devices = "&".join(f"device_id=hist-{i:03d}" for i in range(DEVICES))
        path = (
            f"/api/v1/telemetry/history?{devices}&metric=temp&limit={POINTS}"
            f"&from={start:%Y-%m-%dT%H:%M:%SZ}&to={stop:%Y-%m-%dT%H:%M:%SZ}"
        )
        # Warm up (imports, pool) with a small request, then take the baseline.
        httpx.get(
            f"{base}/api/v1/telemetry/history?device_id=hist-000&metric=temp",
            headers={"X-API-Key": API_KEY},
        )
        baseline = rss_mib(api.pid)
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mib(api.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            results = asyncio.run(attack(base, path, keys, args.requests))
        finally:
            done.set()
            sampler.join()
        after = rss_mib(api.pid)
        print(
            f"settings: {' '.join(args.env) or 'defaults'}; {args.requests} requests over {len(keys)} key(s)"
        )
        for status, size, seconds in results:
            print(f"  status {status}  {size / 2**20:7.2f} MiB body  {seconds:6.2f} s")
        print(
            f"RSS iot-api: baseline {baseline:.0f} MiB, peak {peak:.0f} MiB (+{peak - baseline:.0f}),"
            f" after {after:.0f} MiB"
        )


if __name__ == "__main__":
    main()
