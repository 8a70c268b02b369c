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
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psutil

from iot_common.db import connect
from iot_common.db.migrate import apply_migrations
from iot_common.db.partitions import ensure_partitions

BIN = Path(sys.executable).parent
DATABASE = "iot_bench_history"
SEED_VERSION = 1
DEVICES = 100
POINTS = 10_000
API_KEY = "iotk_benchhistory_" + "h" * 24


def server_url() -> str:
    return os.environ.get("IOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def database_url() -> str:
    return urlunsplit(urlsplit(server_url())._replace(path=f"/{DATABASE}"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def seed() -> tuple[datetime, datetime]:
    """Create and fill the database unless a previous run did; return the range holding the points."""
    admin = await asyncpg.connect(server_url())
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    conn = await connect(database_url())
    try:
        await apply_migrations(conn)
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


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


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
    port = free_port()
    env = {
        **os.environ,
        "IOT_DATABASE_URL": database_url(),
        "IOT_REDIS_URL": "redis://127.0.0.1:6379/0",
        "IOT_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",  # no broker: commands are not measured
        "IOT_API_CACHE_NAMESPACE": f"bench-hist-{uuid.uuid4().hex[:8]}:",
        "IOT_API_PORT": str(port),
        "IOT_BOOTSTRAP_API_KEY": API_KEY,
        "IOT_API_ROLLUP_INTERVAL_S": "0",
        "IOT_LOG_LEVEL": "warning",
        "IOT_LOG_FORMAT": "json",
        **dict(item.split("=", 1) for item in args.env),
    }
    with tempfile.TemporaryDirectory() as tmp:
        log = (Path(tmp) / "api.log").open("wb")
        api = subprocess.Popen([str(BIN / "iot-api")], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or api.poll() is not None:
                    raise SystemExit("iot-api did not start:\n" + (Path(tmp) / "api.log").read_text()[-4000:])
                time.sleep(0.1)
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
                f"settings: {' '.join(args.env) or 'defaults'};"
                f" {args.requests} requests over {len(keys)} key(s)"
            )
            for status, size, seconds in results:
                print(f"  status {status}  {size / 2**20:7.2f} MiB body  {seconds:6.2f} s")
            print(
                f"RSS iot-api: baseline {baseline:.0f} MiB, peak {peak:.0f} MiB (+{peak - baseline:.0f}),"
                f" after {after:.0f} MiB"
            )
        finally:
            api.terminate()
            api.wait(20)
            log.close()


if __name__ == "__main__":
    main()
