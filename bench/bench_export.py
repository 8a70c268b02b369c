"""Telemetry export rate and memory: a year of 1 Hz data of one metric (31,536,000 rows) streamed by
``GET /api/v1/telemetry/export``, with the peak RSS of ``iot-api`` while it streams.

Seeds a dedicated database (``iot_bench_export``, reused when already seeded; about 4 GB, ``--drop``
removes it after the run): daily partitions over the year and one row per second, inserted with
``generate_series`` one day per statement. ``iot-api`` runs as a process on 127.0.0.1; the client reads the
stream as fast as it can and counts its lines; RSS is sampled every 20 ms.

Run: ``uv run python bench/bench_export.py [--days 365] [--format csv] [--gzip] [--drop]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

from iot_common.db import connect
from iot_common.db.partitions import ensure_partitions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import api_process, database_url, migrated_database, server_url
from iot_testkit.measure import rss_mib
from iot_testkit.processes import free_port

DATABASE = "iot_bench_export"
SEED_VERSION = 1
DEVICE = "export-1"
API_KEY = "iotk_benchexport0_" + "e" * 24


async def seed(days: int) -> datetime:
    """Fill ``days`` days of 1 Hz data ending at today's midnight (UTC) unless a previous run did."""
    conn = await connect(await migrated_database(DATABASE, fresh=False))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_seed (version int, days int, start timestamptz,"
            " PRIMARY KEY (version, days))"
        )
        start = await conn.fetchval(
            "SELECT start FROM bench_seed WHERE version = $1 AND days = $2", SEED_VERSION, days
        )
        if start is not None:
            return start  # type: ignore[no-any-return]
        start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days)
        await conn.execute("TRUNCATE devices, telemetry, bench_seed CASCADE")
        await ensure_partitions(conn, start.date(), (start + timedelta(days=days + 7)).date())
        await conn.execute("INSERT INTO devices (id) VALUES ($1)", DEVICE)
        await conn.execute("SET synchronous_commit = off")
        began = time.monotonic()
        for day in range(days):
            await conn.execute(
                "INSERT INTO telemetry (device_id, metric, ts, value)"
                " SELECT $1, 'power', $2::timestamptz + s * interval '1 second', 100 + (s % 600) / 10.0"
                " FROM generate_series(0, 86399) s",
                DEVICE,
                start + timedelta(days=day),
            )
            if day % 30 == 29:
                print(f"  seeded {day + 1} days ({time.monotonic() - began:.0f} s)", flush=True)
        await conn.execute("ANALYZE telemetry")
        await conn.execute("INSERT INTO bench_seed VALUES ($1, $2, $3)", SEED_VERSION, days, start)
        print(f"seeded {days * 86400:,} rows in {time.monotonic() - began:.0f} s")
        return start
    finally:
        await conn.close()


async def export(base: str, params: dict[str, str], gzip: bool) -> tuple[int, int, int, float]:
    """(status, body bytes on the wire, lines, seconds) of one export read to its end."""
    headers = {"X-API-Key": API_KEY, "Accept-Encoding": "gzip" if gzip else "identity"}
    began = time.monotonic()
    size = lines = 0
    inflate = zlib.decompressobj(31)
    async with (
        httpx.AsyncClient(timeout=600) as client,
        client.stream("GET", f"{base}/api/v1/telemetry/export", params=params, headers=headers) as response,
    ):
        async for chunk in response.aiter_raw():
            size += len(chunk)
            lines += (inflate.decompress(chunk) if gzip else chunk).count(b"\n")
        status = response.status_code
    return status, size, lines, time.monotonic() - began


async def drop() -> None:
    admin = await asyncpg.connect(server_url())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--format", default="csv", choices=["csv", "ndjson"])
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--drop", action="store_true", help="drop the benchmark database afterwards")
    args = parser.parse_args()
    start = asyncio.run(seed(args.days))
    env = {
        "IOT_DATABASE_URL": database_url(DATABASE),
        "IOT_REDIS_URL": "redis://127.0.0.1:6379/0",
        "IOT_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",  # no broker: commands are not measured
        "IOT_API_CACHE_NAMESPACE": f"bench-export-{uuid.uuid4().hex[:8]}:",
        "IOT_BOOTSTRAP_API_KEY": API_KEY,
        "IOT_TELEMETRY_RETENTION_DAYS": str(args.days + 30),
    }
    params = {
        "device_id": DEVICE,
        "metric": "power",
        "format": args.format,
        "from": f"{start:%Y-%m-%dT%H:%M:%SZ}",
        "to": f"{start + timedelta(days=args.days):%Y-%m-%dT%H:%M:%SZ}",
    }
    try:
        with api_process(env, timeout=60) as api:
            small = {**params, "to": f"{start + timedelta(minutes=1):%Y-%m-%dT%H:%M:%SZ}"}
            warm = asyncio.run(export(api.base, small, args.gzip))  # imports, pool, first query
            assert warm[0] == 200, warm
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
                status, size, lines, seconds = asyncio.run(export(api.base, params, args.gzip))
            finally:
                done.set()
                sampler.join()
        rows = lines - (1 if args.format == "csv" else 0)
        print(
            f"export {args.days} days x 86,400 rows, {args.format}{' gzip' if args.gzip else ''}:"
            f" status {status},"
            f" {rows:,} rows, {size / 2**20:,.0f} MiB on the wire in {seconds:.1f} s:"
            f" {rows / seconds:,.0f} rows/s"
        )
        print(f"RSS iot-api: baseline {baseline:.0f} MiB, peak {peak:.0f} MiB (+{peak - baseline:.0f})")
        if rows != args.days * 86400 or status != 200:
            raise SystemExit(f"expected {args.days * 86400} rows with status 200")
    finally:
        if args.drop:
            asyncio.run(drop())


if __name__ == "__main__":
    main()
