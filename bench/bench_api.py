"""API benchmark: requests/s for the device list and latest values, p50/p95 of a month-long aggregate.

Seeds a dedicated database (``iot_bench_api``, reused when already seeded): 1,000 devices, and one device
with a month of 1 Hz data for 3 metrics (~7.8 M rows, inserted with generate_series, then rolled up the
way the API's rollup job does it). Latest values go into a private redis-server on a free port. ``iot-api``
runs as a process; the load comes from a separate process (aiohttp, N concurrent connections), all on
127.0.0.1. The machine is small and shared: figures are noisy, compare medians of several runs.

Run: ``make bench`` or ``uv run python bench/bench_api.py [--duration 8] [--concurrency 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import httpx
import msgspec
import redis

from iot_api.rollup import roll_up
from iot_common.db import connect
from iot_common.db.partitions import ensure_partitions
from iot_common.messages import LatestValue
from iot_common.topics import RedisNames

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import LoadResult, api_process, database_url, in_process, migrated_database
from iot_testkit.measure import percentile
from iot_testkit.processes import private_redis

NAMES = RedisNames()  # the default IOT_REDIS_PREFIX of the services here

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "iot_bench_api"
SEED_VERSION = 2  # 2: rollups at minute, hour and day (migration 0013)
DEVICES = 1000
HOT_DEVICE = "bench-0000"
METRICS = ("temp", "hum", "press")
DAYS = 30
API_KEY = "iotk_benchbenchbe_" + "b" * 24


async def seed() -> tuple[datetime, datetime]:
    """Create and fill the benchmark database unless a previous run did; return the month's range."""
    conn = await connect(await migrated_database(DATABASE, fresh=False))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_seed"
            " (version int PRIMARY KEY, start timestamptz, stop timestamptz)"
        )
        row = await conn.fetchrow("SELECT start, stop FROM bench_seed WHERE version = $1", SEED_VERSION)
        if row is not None:
            print(f"reusing seeded database {DATABASE}", flush=True)
            return row["start"], row["stop"]
        stop = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        start = stop - timedelta(days=DAYS)
        await conn.execute(
            "TRUNCATE devices, telemetry, telemetry_minutely, telemetry_hourly, telemetry_daily,"
            " telemetry_rollup_dirty, telemetry_rollup_state CASCADE"
        )
        await ensure_partitions(conn, start.date() - timedelta(days=1), stop.date() + timedelta(days=7))
        await conn.execute(
            """
            INSERT INTO devices (id, name, type, status, last_seen)
            SELECT format('bench-%s', lpad(i::text, 4, '0')), format('Bench %s', i),
                   (ARRAY['thermo', 'pump', 'valve'])[1 + i % 3], 'online', now()
            FROM generate_series(0, $1 - 1) i
            """,
            DEVICES,
        )
        await conn.execute("SET synchronous_commit = off")
        began = time.monotonic()
        for day in range(DAYS):
            lo = start + timedelta(days=day)
            await conn.execute(
                """
                INSERT INTO telemetry (device_id, metric, ts, value)
                SELECT $1, m, ts, 20 + 10 * sin(extract(epoch FROM ts) / 3600) + random()
                FROM unnest($2::text[]) m, generate_series($3::timestamptz, $4, interval '1 second') ts
                """,
                HOT_DEVICE,
                list(METRICS),
                lo,
                lo + timedelta(days=1) - timedelta(seconds=1),
            )
            print(
                f"\rseeding telemetry: day {day + 1}/{DAYS} ({time.monotonic() - began:.0f} s)",
                end="",
                flush=True,
            )
        print(flush=True)
        await roll_up(conn, lag=timedelta(0), retention_days=DAYS + 5)
        await conn.execute("ANALYZE")
        await conn.execute("INSERT INTO bench_seed VALUES ($1, $2, $3)", SEED_VERSION, start, stop)
        print(f"seeded in {time.monotonic() - began:.0f} s", flush=True)
        return start, stop
    finally:
        await conn.close()


async def _load(base: str, paths: list[str], concurrency: int, duration: float, count: int) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base, connector=connector, headers={"X-API-Key": API_KEY}) as http:

        async def worker() -> None:
            nonlocal errors, issued
            while time.monotonic() < deadline and (count == 0 or issued < count):
                issued += 1
                path = random.choice(paths)
                began = time.perf_counter()
                async with http.get(path) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - began) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return LoadResult(len(latencies), errors, elapsed, latencies)


def load(base: str, paths: list[str], concurrency: int, duration: float, count: int = 0) -> LoadResult:
    """Run the load in a separate process, so the client does not share an event loop with anything."""
    return in_process(_load, base, paths, concurrency, duration, count, timeout=duration + 120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per throughput scenario")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--aggregate-requests", type=int, default=200)
    args = parser.parse_args()

    start, stop = asyncio.run(seed())
    with private_redis() as redis_server:
        redis_url = redis_server.url
        client = redis.Redis.from_url(redis_url)
        now = datetime.now(UTC)
        pipe = client.pipeline(transaction=False)
        for i in range(DEVICES):
            for m in METRICS:
                pipe.hset(
                    NAMES.latest_key(f"bench-{i:04d}"), m, msgspec.json.encode(LatestValue(float(i), now))
                )
        pipe.execute()

        env = {
            "IOT_DATABASE_URL": database_url(DATABASE),
            "IOT_REDIS_URL": redis_url,
            "IOT_BOOTSTRAP_API_KEY": API_KEY,
            "IOT_API_RATE_LIMIT_PER_MINUTE": "100000000",
            "IOT_TELEMETRY_RETENTION_DAYS": str(DAYS + 5),
            "IOT_ROLLUP_RETENTION_DAYS_MINUTE": str(DAYS + 5),  # at least the raw retention
            "IOT_DATABASE_POOL_MAX": "20",
        }
        with api_process(env) as api:
            base = api.base
            month = f"from={start:%Y-%m-%dT%H:%M:%SZ}&to={stop:%Y-%m-%dT%H:%M:%SZ}"
            aggregate = (
                f"/api/v1/devices/{HOT_DEVICE}/telemetry?metric=temp&bucket=1h&agg=avg,min,max&{month}"
            )
            check = httpx.get(base + aggregate, headers={"X-API-Key": API_KEY}, timeout=30).json()
            assert len(check["points"]) == DAYS * 24, check
            scenarios = [
                ("device list (limit 50)", ["/api/v1/devices?limit=50"], args.concurrency, 0),
                ("device list alias", ["/api/v1/device/list?limit=50"], args.concurrency, 0),
                (
                    "device by id",
                    [f"/api/v1/devices/bench-{i:04d}" for i in range(DEVICES)],
                    args.concurrency,
                    0,
                ),
                (
                    "latest values",
                    [f"/api/v1/devices/bench-{i:04d}/latest" for i in range(DEVICES)],
                    args.concurrency,
                    0,
                ),
                (
                    "latest of 20 devices",
                    [
                        "/api/v1/telemetry/latest?"
                        + "&".join(f"device_id=bench-{i:04d}" for i in range(j, j + 20))
                        for j in range(0, 980, 20)
                    ],
                    args.concurrency,
                    0,
                ),
                ("month, 1h buckets (serial)", [aggregate], 1, args.aggregate_requests),
                (
                    "month, 1d buckets (serial)",
                    [aggregate.replace("bucket=1h", "bucket=1d")],
                    1,
                    args.aggregate_requests,
                ),
                (
                    "raw page of 1000 (serial)",
                    [f"/api/v1/devices/{HOT_DEVICE}/telemetry?metric=temp&limit=1000"],
                    1,
                    args.aggregate_requests,
                ),
            ]
            rows = []
            for name, paths, concurrency, count in scenarios:
                load(base, paths[:1], 4, 1.0, 20)  # warm-up: caches, connections, plans
                result = load(base, paths, concurrency, args.duration, count)
                rows.append((name, concurrency, result))
            print()
            header = ("scenario", "conc", "requests", "errors", "req/s", "p50 ms", "p95 ms")
            print(f"{header[0]:32} " + " ".join(f"{h:>8}" for h in header[1:]))
            for name, concurrency, r in rows:
                print(
                    f"{name:32} {concurrency:>8} {r.requests:>8} {r.errors:>8} "
                    f"{r.requests / r.seconds:>8.0f} "
                    f"{statistics.median(r.latencies_ms):>8.2f} {percentile(r.latencies_ms, 0.95):>8.2f}"
                )
            monthly = rows[5][2]
            p95 = percentile(monthly.latencies_ms, 0.95)
            print()
            print(
                f"month-long hourly aggregate ({DAYS * 24} buckets over {DAYS * 86400:,} rows per metric): "
                f"p50 {statistics.median(monthly.latencies_ms):.2f} ms, p95 {p95:.2f} ms "
                f"(target p95 < 50 ms: {'met' if p95 < 50 else 'NOT met'})"
            )
            if any(r.errors for _, _, r in rows):
                raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
